"""Compactor (Chari & Van Durme, arXiv 2507.08143): outlier keys plus what the chunk attends to.

Two query-agnostic signals, both z-normalised so that they add up: the approximate statistical
leverage of each pre-RoPE key among its head's keys (a key no other key can stand for; computed
on a right Gaussian sketch of the centred keys, D → ``sketch_dimension`` columns, through a
Cholesky factor of the sketch's Gram matrix), and the non-causal chunked attention
(:mod:`kvtrim.scorers.noncausal`). Score = ``blending`` · leverage + attention; ``blending``
defaults to the compression ratio the budget asks for (the paper's heuristic: the harder the
compression, the more geometry matters). The first ``sink_start`` and last ``sink_end`` pairs are
always kept, and the two signals are computed on the pairs between them only.

Pre-RoPE keys are recovered by rotating the cached keys back (RoPE is a rotation; layers with a
RoPE scaling factor other than 1 would need it divided out, which no supported model uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.scorers.noncausal import chunked_attention_received, z_normalise

#: the blend weight when the budget gives no count to derive a ratio from (the paper's default)
FALLBACK_BLENDING = 0.35


def sketched_leverage(keys: torch.Tensor, sketch: torch.Tensor, jitter: float = 1e-2) -> torch.Tensor:
    """Approximate leverage of every row of each head's centred keys.

    keys: (B, Hkv, T, D); sketch: (D, k). With X = (K − mean K)·sketch (T, k), the leverage of row t
    is x_tᵀ (XᵀX)⁻¹ x_t, solved through a Cholesky factor of XᵀX (+ jitter·I, raised tenfold until
    the factorisation succeeds). Returns (B, Hkv, T), ≥ 0.
    """
    x = (keys.float() - keys.float().mean(dim=-2, keepdim=True)) @ sketch  # (B, Hkv, T, k)
    gram = x.transpose(-1, -2) @ x  # (B, Hkv, k, k)
    eye = torch.eye(gram.shape[-1], device=gram.device)
    added = jitter
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(gram + added * eye)
        if bool((info == 0).all()):
            break
        added *= 10
    solved = torch.cholesky_solve(x.transpose(-1, -2), factor)  # (B, Hkv, k, T) = (XᵀX)⁻¹ Xᵀ
    return (x * solved.transpose(-1, -2)).sum(dim=-1).clamp_min(0.0)  # (B, Hkv, T)


@dataclass
class Compactor(Scorer):
    """``blending`` · z(leverage of the pre-RoPE keys) + z(non-causal chunked attention); sinks kept."""

    name = "compactor"
    summary = "Compactor: sketched leverage of the keys blended with non-causal chunked attention."
    paper = "arXiv 2507.08143"
    uses_budget = True
    sink_start: int = 8
    sink_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None

    def __post_init__(self) -> None:
        if self.sink_start < 0 or self.sink_end < 0:
            raise KVTrimError("sink_start and sink_end must be >= 0.")
        if self.chunk_size < 1 or self.sketch_dimension < 1:
            raise KVTrimError("chunk_size and sketch_dimension must be >= 1.")

    def blend_weight(self, view: LayerView) -> float:
        if self.blending is not None:
            return self.blending
        seq = view.keys.shape[-2]
        if view.budget_keep is None or not seq:
            return FALLBACK_BLENDING
        return 1.0 - view.budget_keep / seq  # the ratio this layer is compressed at

    def score(self, view: LayerView) -> torch.Tensor:
        bsz, n_kv, seq, dim = view.keys.shape
        if len(view.query_positions) != seq:
            raise KVTrimError(
                "Compactor scores a prefill in one shot: every cached pair needs its own query "
                "(no chunked prefill, no eviction while decoding)."
            )
        start = min(self.sink_start, seq)
        end = max(start, seq - self.sink_end)
        scores = torch.full((bsz, n_kv, seq), torch.inf, device=view.keys.device)  # (B, Hkv, T)
        if end <= start:
            return scores
        positions = view.key_positions[start:end]  # (M,)
        keys = view.keys[..., start:end, :]  # (B, Hkv, M, D)
        pre_rope = view.rotate(keys, -positions)  # (B, Hkv, M, D): RoPE undone
        gen = torch.Generator().manual_seed(view.seed * 1000 + view.layer_idx)
        sketch = torch.randn(dim, self.sketch_dimension, generator=gen) / self.sketch_dimension**0.5  # (D, k)
        leverage = z_normalise(sketched_leverage(pre_rope, sketch.to(keys.device)))  # (B, Hkv, M)
        queries = view.queries(rotated=True)[..., start:end, :]  # (B, H, M, D)
        received = chunked_attention_received(queries, keys, self.chunk_size)  # (B, Hkv, M)
        attention = received * view.values[..., start:end, :].float().norm(dim=-1)  # (B, Hkv, M)
        attention = torch.nn.functional.avg_pool1d(attention, 3, stride=1, padding=1)
        scores[..., start:end] = self.blend_weight(view) * leverage + z_normalise(attention)
        return scores
