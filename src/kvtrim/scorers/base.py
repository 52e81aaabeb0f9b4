"""What a scorer sees (:class:`LayerView`) and what it must provide (:class:`Scorer`).

A scorer maps one attention layer's cache to one score per (batch, kv-head, position); higher
means keep. Scorers never touch the model or the cache: the engine hands them a ``LayerView``
with lazily computed queries and the layer's own RoPE, which keeps each scorer a few dozen lines
and testable on plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class LayerView:
    """One attention layer during compression.

    keys / values: (B, Hkv, T, D), keys after RoPE, exactly as cached.
    key_positions: (T,) absolute position of every cached pair, or (B, Hkv, T) when earlier
        evictions (chunked prefill) left each head its own positions (``Scorer.chunkable``).
    query_positions: (Tq,) absolute positions of the tokens of the current forward (the last Tq keys).
    output_weight: (H, D, hidden) the output projection split per query head, W_o^h, so that the
        layer's output is Σ_h attn_h @ W_o^h; None when the engine cannot find it. Lets a scorer
        judge a value by what it adds to the output (CriticalKV), not by its raw norm.
    budget_keep: pairs per head the budget will keep in this layer (a mean for head-adaptive
        budgets), or None when the budget has no fixed count (threshold). Lets a scorer rank in
        stages relative to the budget (CriticalKV) without choosing the kept set itself.
    hidden_states: (B, Tq, hidden) the layer's input (after its input norm) for the current
        forward's tokens, or None where the view's queries are not this forward's (decoding
        eviction). Lets a learned scorer (KVzap) predict each pair's score from what made it.
    question_length: how many of the forward's last tokens are the question (query-aware
        compression), 0 otherwise. Lets FINCH observe with exactly the question's queries.
    """

    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor
    key_positions: torch.Tensor
    query_positions: torch.Tensor
    n_heads: int
    head_dim: int
    scaling: float
    #: () -> all queries (B, H, Tq, D) pre-RoPE; (n) -> only the last n of them
    pre_rope_queries: Callable[..., torch.Tensor]
    rotate_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seed: int = 0
    output_weight: torch.Tensor | None = None
    budget_keep: int | None = None
    hidden_states: torch.Tensor | None = None
    question_length: int = 0
    #: identifies the layer's RoPE (layers sharing it share rotations); None disables caching
    rope_key: Any = None
    #: shared across the layers of one compression, so R̄ is computed once, not once per layer
    rotation_cache: dict[Any, torch.Tensor] = field(default_factory=dict)

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def queries(self, rotated: bool = False, last: int | None = None) -> torch.Tensor:
        """Queries of the current forward's tokens: (B, H, Tq, D), pre-RoPE (q-norm applied) or
        post-RoPE. ``last=n`` computes only the last n of them (B, H, n, D) — the same values."""
        if last is None:
            q, positions = self.pre_rope_queries(), self.query_positions
        else:
            last = min(last, len(self.query_positions))
            q, positions = self.pre_rope_queries(last), self.query_positions[-last:]
        return self.rotate(q, positions) if rotated else q

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the layer's RoPE to x: (B, H, P, D) at positions (P,)."""
        return self.rotate_fn(x, positions)

    def mean_rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """R̄ = mean_p R_p over ``positions``, as a (D, D) matrix with R̄ @ x = mean_p rotate(x, p)."""
        key = None
        if self.rope_key is not None and len(positions):
            first, last, device = int(positions[0]), int(positions[-1]), self.keys.device
            key = (self.rope_key, first, last, len(positions), self.keys.dtype, device)
            if key in self.rotation_cache:
                return self.rotation_cache[key]
        d = self.head_dim
        eye = torch.eye(d, dtype=torch.float32, device=self.keys.device)
        basis = eye[None, :, None, :].expand(1, d, len(positions), d)  # (1, D basis vectors, P, D)
        rotated = self.rotate(basis.to(self.keys.dtype), positions).float()  # (1, D, P, D)
        # rotated[0, j].mean(0) = R̄ e_j, i.e. column j of R̄
        mean_rot = rotated[0].mean(1).T.contiguous()  # (D, D)
        if key is not None:
            if len(self.rotation_cache) >= 64:  # one entry per context length seen: stay bounded
                self.rotation_cache.clear()
            self.rotation_cache[key] = mean_rot
        return mean_rot


class Scorer:
    """Base class of every scoring method. Subclasses are dataclasses whose fields are options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: False only for ``none``: the engine then never evicts.
    evicts: ClassVar[bool] = True
    #: True when the scorer accepts per-head key positions (B, Hkv, T), as chunked prefill gives
    chunkable: ClassVar[bool] = False
    #: True when the scorer must see the question while compressing: ``kvtrim.compress`` then
    #: requires ``question=`` (prefilled and compressed after the context) and the benchmark
    #: gives every such cell a prefill of its own instead of the shared one.
    query_aware: ClassVar[bool] = False
    #: True when the scorer needs extra forwards over the whole, uncompressed prefilled cache
    #: (KVzip's context reconstruction): the context is then prefilled without eviction and
    #: :mod:`kvtrim.reconstruction` scores and evicts afterwards (see ``reconstruction_inputs``)
    needs_reconstruction: ClassVar[bool] = False
    #: True when the scores depend on ``LayerView.budget_keep`` (so a shared prefill rescores per ratio)
    uses_budget: ClassVar[bool] = False
    #: True when a reconstruction scorer weighs attention by the gradient of the reconstruction's
    #: log-likelihood (KVgrad): before each reconstruction forward the strategy runs a backward
    #: pass and sets ``output_gradients`` (layer -> (B, H, q) norms per head and query)
    needs_output_gradients: ClassVar[bool] = False

    def setup(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Prepare model-specific data once (e.g. calibration); default: nothing."""

    def score(self, view: LayerView) -> torch.Tensor:
        """Return scores of shape (B, Hkv, T); higher = keep."""
        raise NotImplementedError

    def score_reconstruction(self, view: LayerView, lse: torch.Tensor | None, n_context: int) -> torch.Tensor:
        """Scores (B, Hkv, n_context) of the context pairs from one reconstruction forward, whose
        queries are the view's; ``lse`` (B, H, q) is the log-sum-exp of their scaled scores over the
        whole cache, as the model's attention computed it (None where it was not kept)."""
        return self.score(view)[..., :n_context]
