"""One attention call as a schedule sees it: the layer, its positions, and the scorer's view of it.

Built by the engine for every hooked call. It builds :class:`~kvtrim.scorers.LayerView` s — keys
and values as cached, queries computed lazily from the stashed projection, the layer's own RoPE —
and does the bookkeeping every compressing step shares (sliding-window layers, peak bytes, time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.cache.layers import (
    cache_bytes,
    compact,
    is_first_forward,
    layer_bytes,
    layer_heads,
    layer_tokens,
    logical_bytes,
)
from kvtrim.cache.layers import (
    is_sliding as layer_is_sliding,
)
from kvtrim.core.clock import device_time
from kvtrim.core.stats import CompressionStats
from kvtrim.models.adapters import LayerInternals, queries_from_projection
from kvtrim.scorers.base import LayerView


class ForwardPositions:
    """Positions derived from one forward's ``position_ids``, computed once for all its layers.

    Every layer of a forward gets the same ``position_ids`` tensor, and each derived tensor (the
    query positions, a one-shot prefill's key positions) is the same in all of them; computing it
    once instead of per layer saves a few small tensor operations per layer, which cost tens of µs
    each right after the layer's large products. The memo holds ``position_ids`` itself, so a new
    forward's tensor is never mistaken for the old one; callers must not modify what it returns.
    """

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._derived: dict[Any, torch.Tensor] = {}

    def get(
        self, position_ids: torch.Tensor | None, key: Any, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if position_ids is not self._source:
            self._source, self._derived = position_ids, {}
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]


@dataclass
class LayerCall:
    """Layer ``idx`` (of ``n_layers``) right after its attention ran in one forward of ``q_len`` tokens."""

    model: nn.Module
    stats: CompressionStats
    seed: int
    n_layers: int
    idx: int
    internals: LayerInternals
    cache: Any
    kwargs: dict[str, Any]
    projected: torch.Tensor | None  # (B, q, ≥ H·D) the query projection's output
    #: the question's tokens at the end of this forward (query-aware compression), else 0
    question_tokens: int = 0
    #: positions shared by the layers of one forward (the engine keeps one for all its calls)
    forward_positions: ForwardPositions = field(default_factory=ForwardPositions)

    @property
    def device(self) -> torch.device:
        """Where this forward runs (its hidden states' device)."""
        return self.kwargs["hidden_states"].device

    @property
    def q_len(self) -> int:
        """Tokens of the current forward."""
        return int(self.kwargs["hidden_states"].shape[1])

    @property
    def attn(self) -> nn.Module:
        return self.internals.attn

    @property
    def layer(self) -> Any:
        return self.cache.layers[self.idx]

    @property
    def is_sliding(self) -> bool:
        return layer_is_sliding(self.layer)

    @property
    def is_first_forward(self) -> bool:
        return is_first_forward(self.layer, self.q_len)

    # --- positions --------------------------------------------------------------------------------

    def query_positions(self) -> torch.Tensor:
        """(q,) absolute positions of the current forward's tokens (batch element 0's)."""
        position_ids = self.kwargs.get("position_ids")
        device = self.device
        q_len = self.q_len

        def compute() -> torch.Tensor:
            if position_ids is None:
                return torch.arange(q_len, device=device)
            return position_ids[0, -q_len:].to(device)

        return self.forward_positions.get(position_ids, ("query", q_len, device), compute)

    def key_positions(self, keys: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Absolute positions of the layer's cached pairs: (T,) while every head holds the same
        contiguous range, (B, Hkv, T) once earlier evictions (``previous``) left each head its own."""
        seq = keys.shape[-2]
        position_ids = self.kwargs.get("position_ids")
        if position_ids is None:
            return self.forward_positions.get(
                None, ("keys", seq, keys.device), lambda: torch.arange(seq, device=keys.device)
            )
        new = position_ids[0].to(keys.device)  # (q,)
        if previous is None or previous.shape[-1] + len(new) != seq:
            return self.forward_positions.get(
                position_ids,
                ("keys", seq, keys.device),
                lambda: torch.arange(seq, device=keys.device) + (int(new[-1]) + 1 - seq),  # (T,)
            )
        fresh = new[None, None].expand(*previous.shape[:2], -1)  # (B, Hkv, q)
        return torch.cat([previous, fresh], dim=-1)  # (B, Hkv, T)

    # --- views ------------------------------------------------------------------------------------

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the layer's RoPE to x: (B, H, P, D) at positions (P,) (negative ones turn back)."""
        with torch.inference_mode():
            cos, sin = self.internals.rotary(positions, like=x)
            return self.internals.rope(x, x, cos, sin)[0]

    def view(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_positions: torch.Tensor,
        *,
        projected: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        budget_keep: int | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> LayerView:
        """What a scorer sees of this layer: ``keys``/``values`` (B, Hkv, T, D) at ``key_positions``,
        queries from ``projected`` (default: this forward's, with its ``hidden_states``) at
        ``query_positions``."""
        layer = self.internals
        attn, rotary = layer.attn, layer.rotary
        if projected is None:
            projected = self.projected
            hidden_states = self.kwargs["hidden_states"] if hidden_states is None else hidden_states

        def pre_rope_queries(last: int | None = None) -> torch.Tensor:
            if projected is None:
                raise RuntimeError("queries were not captured for this layer")
            with torch.inference_mode():
                return queries_from_projection(attn, projected if last is None else projected[:, -last:])

        return LayerView(
            layer_idx=self.idx,
            keys=keys,
            values=values,
            key_positions=key_positions,
            query_positions=self.query_positions() if query_positions is None else query_positions,
            n_heads=layer.n_heads,
            head_dim=layer.head_dim,
            scaling=layer.scaling,
            pre_rope_queries=pre_rope_queries,
            rotate_fn=self.rotate,
            seed=self.seed,
            output_weight=layer.output_weight,
            budget_keep=budget_keep,
            hidden_states=hidden_states,
            question_length=self.question_tokens if query_positions is None else 0,
            rope_key=("rope", rotary.layer_type),
            rotation_cache=layer.rotations,
        )

    def element_view(self, b: int, pad: int, budget_keep: Callable[[int], int | None]) -> LayerView:
        """Element b of a left-padded batch as if alone: its own pairs, queries and positions."""
        layer = self.layer
        keys = layer.keys[b : b + 1, :, pad:]  # (1, Hkv, T_b, D)
        values = layer.values[b : b + 1, :, pad:]
        positions = torch.arange(keys.shape[-2], device=keys.device)  # (T_b,)
        own = None if self.projected is None else self.projected[b : b + 1, pad:]  # (1, T_b, H·D)
        return self.view(
            keys,
            values,
            positions,
            projected=own,
            query_positions=positions,
            budget_keep=budget_keep(keys.shape[-2]),
            hidden_states=self.kwargs["hidden_states"][b : b + 1, pad:],  # (1, T_b, hidden)
        )

    # --- bookkeeping ------------------------------------------------------------------------------

    def compress(self, action: Callable[[LayerCall], None], windows: bool = False) -> None:
        """Run one compressing step on this layer, with the bookkeeping every step shares.

        A sliding-window layer is already bounded by its window, so unless ``windows`` says to
        compress it within its window it is left whole; but transformers keeps the window as a
        slice of the whole prefill's tensor, holding all T pairs alive: copying the window out
        frees them. Otherwise the moment this layer holds its uncompressed pairs is when the cache
        peaks, and ``action`` is timed as compression.
        """
        layer = self.layer
        if self.is_sliding and not windows:
            held = layer_tokens(layer)
            before = logical_bytes(layer.keys) + logical_bytes(layer.values)
            layer.keys, layer.values = compact(layer.keys), compact(layer.values)
            self.account(layer, before, held, held)
            return
        self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, cache_bytes(self.cache))
        start = device_time(self.device)
        action(self)
        self.stats.compress_s += device_time(self.device) - start

    def account(self, layer: Any, bytes_before: int, seq: int, keep: float) -> None:
        """Record one layer; ``keep`` is pairs per head (a mean for ragged layers)."""
        self.stats.add_layer(bytes_before, layer_bytes(layer), seq, keep, layer_heads(layer))
