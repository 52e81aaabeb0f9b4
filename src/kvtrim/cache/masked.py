"""The layer of a cell batch: many compressed caches of one context as the rows of one batch.

Each row holds one cell's kept pairs per KV head, left-padded to the longest head of the layer
across rows, and a visibility mask (row, head, slot) hides the padding, so every head of every
row attends to exactly its own kept pairs plus the new tokens (:mod:`kvtrim.attention.masked`).
The padding is an evaluation cost while the batch decodes, not what a served cache holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvtrim.attention.standins import MaskedKV
from kvtrim.cache.layers import KVTrimLayer, tensor_bytes


class HeadMaskedLayer(KVTrimLayer):
    """Preallocated (B, Hkv, capacity, D) buffers filled up to ``length``.

    New tokens are written in place (no concatenation of the whole cache at every step) and are
    visible to every head.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.visible = keys, values, visible
        self.length = length
        self.device = keys.device
        self.is_initialized = True

    @classmethod
    def stack(cls, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], room: int) -> HeadMaskedLayer:
        """rows: B × Hkv × (keys (K_bh, D), values (K_bh, Dv)) -> one left-padded layer with room
        for ``room`` more tokens."""
        first_k, first_v = rows[0][0]
        n_heads = len(rows[0])
        width = max(k.shape[0] for row in rows for k, _ in row)
        size = (len(rows), n_heads, width + room)
        keys = first_k.new_zeros(*size, first_k.shape[-1])  # (B, Hkv, L + room, D)
        values = first_v.new_zeros(*size, first_v.shape[-1])
        visible = torch.zeros(size, dtype=torch.bool, device=first_k.device)  # (B, Hkv, L + room)
        for b, row in enumerate(rows):
            for h, (k, v) in enumerate(row):
                keys[b, h, width - k.shape[0] : width] = k
                values[b, h, width - k.shape[0] : width] = v
                visible[b, h, width - k.shape[0] : width] = True
        return cls(keys, values, visible, width)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Write new (B, Hkv, q, D) states after the filled slots; returns a :class:`MaskedKV`."""
        end = self.length + key_states.shape[2]
        if end > self.keys.shape[2]:  # out of room: grow (rare; the room is sized for the answer)
            extra = end - self.keys.shape[2]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, extra))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))
            self.visible = torch.nn.functional.pad(self.visible, (0, extra))
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.visible[:, :, self.length : end] = True
        self.length = end
        masked = MaskedKV(self.keys[:, :, :end], self.values[:, :, :end], self.visible[:, :, :end])
        return masked, masked  # the attention function reads .keys of the first, .values of the second

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (B',) — the rows still decoding."""
        self.keys, self.values, self.visible = self.keys[indices], self.values[indices], self.visible[indices]

    def get_seq_length(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return tensor_bytes(self.keys) + tensor_bytes(self.values) + tensor_bytes(self.visible)

    def n_pairs(self) -> int:
        return int(self.visible[:, :, : self.length].sum())

    def n_heads(self) -> int:
        return int(self.keys.shape[0] * self.keys.shape[1])

    def batch_size(self) -> int:
        return int(self.keys.shape[0])

    def head_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise ValueError("a cell batch holds many rows; it is never stacked again")

    def state(self) -> dict[str, Any]:
        raise ValueError("a cell batch writes in place; it cannot be snapshotted")
