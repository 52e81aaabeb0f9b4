"""Sliding-window layers compressed within their window: each head keeps some of its window's
pairs, and every pair still leaves the window when a query is W or more positions past it.

Gemma 3 keeps five layers in six as the last W − 1 tokens (transformers'
``DynamicSlidingWindowLayer``), which assumes those tokens are contiguous. Once a head keeps only
some of them, each pair carries its absolute position; attention (:mod:`kvtrim.attention.window`)
lets query t see pair p where t − W < p ≤ t — the model's own sliding mask — and after every
forward the leading slots no head can see any more are dropped, so the layer holds its kept pairs
plus the newer tokens still inside the window, and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.attention.standins import WindowKV
from kvtrim.cache.layers import DenseKVTrimLayer, tensor_bytes


class WindowLayer(DenseKVTrimLayer):
    """A sliding-window layer whose heads keep some pairs of their window, each at its position."""

    is_sliding = True

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, window: int, seen: int
    ):
        super().__init__()
        self.keys = keys  # (B, Hkv, K, D)
        self.values = values  # (B, Hkv, K, Dv)
        self.positions = positions  # (B, Hkv, K) absolute positions, ascending per head
        self.sliding_window = int(window)
        self.cumulative_length = int(seen)  # tokens the layer has seen: the next token's position
        self.device = keys.device
        self.is_initialized = True

    @classmethod
    def from_window(cls, layer: Any, indices: torch.Tensor, window_positions: torch.Tensor) -> WindowLayer:
        """``layer`` (a sliding-window layer) already shrunk to ``indices`` (B, Hkv, K) of its
        window, whose pairs sat at ``window_positions`` (W',)."""
        positions = window_positions.to(indices.device)[indices]  # (B, Hkv, K)
        return cls(layer.keys, layer.values, positions, layer.sliding_window, layer.cumulative_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append (B, Hkv, q, D) new states at the next q positions; returns a :class:`WindowKV`
        twice (the attention function reads .keys of the first, .values of the second)."""
        batch, n_kv, q_len = key_states.shape[:3]
        new = torch.arange(q_len, device=self.positions.device) + self.cumulative_length  # (q,)
        keys = torch.cat([self.keys, key_states], dim=-2)  # (B, Hkv, K + q, D)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, new.expand(batch, n_kv, q_len)], dim=-1)  # (B, Hkv, K + q)
        self.cumulative_length += q_len
        standin = WindowKV(keys, values, positions, self.sliding_window)
        # the next query sits at cumulative_length: pairs at p <= cumulative_length − W are out for good;
        # heads are ascending, so the slots out in every head lead
        gone = int((positions.amax(dim=(0, 1)) <= self.cumulative_length - self.sliding_window).sum())
        self.keys, self.values, self.positions = (
            t[:, :, gone:].clone() if gone else t for t in (keys, values, positions)
        )
        return standin, standin

    def get_seq_length(self) -> int:
        """Tokens seen, as transformers' sliding layer answers (the next token's position)."""
        return self.cumulative_length

    def held_tokens(self) -> int:
        return int(self.keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held_tokens() + query_length, 0  # the model's mask is not read (see window_attention)

    def get_max_length(self) -> int:
        return self.sliding_window

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.keys, self.values, self.positions))

    def head_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.keys[0, h], self.values[0, h]) for h in range(self.keys.shape[1])]

    def state(self) -> dict[str, Any]:
        names = ("keys", "values", "positions", "cumulative_length")
        return {name: getattr(self, name) for name in names}
