"""Non-causal chunked attention (Compactor, Chari & Van Durme, arXiv 2507.08143).

Causal attention scores favour early keys, which every later query sees. Compactor cuts the
prefill into chunks of ``chunk_size`` tokens and lets every query of a chunk attend to every key
of the same chunk, future ones included; a key's score is the attention its chunk's queries give
it in total, times its value's norm (what it adds to an output), smoothed over 3 positions and
z-normalised over the layer's heads and tokens, so that it can be blended with other z-scores
(:mod:`kvtrim.scorers.compactor`). The logits are unscaled (no 1/√D), as in the paper's code; the
last chunk may be short and is softmaxed over its own keys only.

Needs the queries of every scored key, so it scores a one-shot prefill (not chunked prefill, not
decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer


def chunked_attention_received(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Attention each key receives from the queries of its own chunk, non-causally.

    queries: (B, H, T, D) post-RoPE; keys: (B, Hkv, T, D), query head h reading kv-head h // G.
    Returns (B, Hkv, T): Σ over the chunk's queries of softmax(q·k over the chunk's keys), averaged
    over the G query heads of each kv-head.
    """
    bsz, n_kv, seq, dim = keys.shape
    group = queries.shape[1] // n_kv
    q = queries.float().reshape(bsz, n_kv, group, seq, dim)  # (B, Hkv, G, T, D)
    k = keys.float()
    received = torch.empty(bsz, n_kv, seq, device=keys.device)  # (B, Hkv, T)
    full = seq // chunk_size * chunk_size
    if full:  # every whole chunk in one batched product
        n = full // chunk_size
        qc = q[..., :full, :].reshape(bsz, n_kv, group, n, chunk_size, dim)  # (B, Hkv, G, N, C, D)
        kc = k[..., :full, :].reshape(bsz, n_kv, 1, n, chunk_size, dim)  # (B, Hkv, 1, N, C, D)
        probs = torch.softmax(qc @ kc.transpose(-1, -2), dim=-1)  # (B, Hkv, G, N, C, C)
        received[..., :full] = probs.sum(dim=-2).mean(dim=2).reshape(bsz, n_kv, full)
    if full < seq:  # the short last chunk
        qt, kt = q[..., full:, :], k[:, :, None, full:, :]  # (B, Hkv, G, r, D), (B, Hkv, 1, r, D)
        probs = torch.softmax(qt @ kt.transpose(-1, -2), dim=-1)  # (B, Hkv, G, r, r)
        received[..., full:] = probs.sum(dim=-2).mean(dim=2)
    return received


def z_normalise(scores: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T) -> the same, minus the mean and over the std of each batch element's scores."""
    flat = scores.flatten(1)  # (B, Hkv·T)
    mean = flat.mean(dim=1)[:, None, None]
    std = flat.std(dim=1).nan_to_num(0.0).clamp_min(1e-6)[:, None, None]
    return (scores - mean) / std


def noncausal_scores(view: LayerView, chunk_size: int, kernel_size: int = 3) -> torch.Tensor:
    """The non-causal chunked attention z-scores (B, Hkv, T) of a prefill's pairs."""
    seq = view.keys.shape[-2]
    if len(view.query_positions) != seq:
        raise KVTrimError(
            "Non-causal chunked attention scores a prefill in one shot: every cached pair needs its "
            "own query (no chunked prefill, no eviction while decoding)."
        )
    received = chunked_attention_received(view.queries(rotated=True), view.keys, chunk_size)  # (B, Hkv, T)
    scores = received * view.values.float().norm(dim=-1)  # (B, Hkv, T)
    scores = F.avg_pool1d(scores, kernel_size, stride=1, padding=kernel_size // 2)
    return z_normalise(scores)


@dataclass
class NonCausalAttention(Scorer):
    """Attention received within its chunk, every query of the chunk seeing every key, × ‖v‖."""

    name = "non-causal-attention"
    summary = "Attention each key gets from every query of its 256-token chunk (future ones too) × ‖v‖."
    paper = "arXiv 2507.08143"
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise KVTrimError(f"chunk_size must be >= 1, got {self.chunk_size}.")

    def score(self, view: LayerView) -> torch.Tensor:
        return noncausal_scores(view, self.chunk_size)
