"""Ragged cache layers: each KV head stores only its own kept pairs.

Head-adaptive and threshold budgets keep a different number of pairs per head. Padding every head
to the longest and masking (what other libraries do) frees no memory; here each head owns a tensor
of exactly its kept pairs, and attention runs per KV head over its own keys
(:mod:`kvtrim.attention.ragged`).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.attention.channels import select_channels
from kvtrim.attention.standins import RaggedKV
from kvtrim.cache.layers import KVTrimLayer


class RaggedLayer(KVTrimLayer):
    """A cache layer whose heads hold different numbers of pairs (B = 1)."""

    def __init__(self, head_keys: list[torch.Tensor], head_values: list[torch.Tensor]):
        super().__init__()
        self.head_keys = head_keys  # Hkv × (B, K_h, D), or (B, K_h, Dk) once channels are pruned
        self.head_values = head_values
        self.key_channels: torch.Tensor | None = None  # (B, Hkv, Dk) kept key channels (ThinK)
        self.device = head_keys[0].device
        self.is_initialized = True

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> RaggedLayer:
        """keys, values: (1, Hkv, T, D); mask: (1, Hkv, T) -> one compact tensor per head."""
        if keys.shape[0] != 1:
            raise NotImplementedError("ragged (per-head) budgets support batch size 1")
        head_keys, head_values = [], []
        for head in range(keys.shape[1]):
            kept = mask[0, head].nonzero().squeeze(-1)  # (K_h,) sorted positions
            head_keys.append(keys[:, head, kept].contiguous())  # (1, K_h, D)
            head_values.append(values[:, head, kept].contiguous())
        return cls(head_keys, head_values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append new (B, Hkv, q, D) states to every head; returns a :class:`RaggedKV`."""
        if self.key_channels is not None:
            key_states = select_channels(key_states, self.key_channels)  # (B, Hkv, q, Dk)
        self.head_keys = [torch.cat([k, key_states[:, h]], dim=1) for h, k in enumerate(self.head_keys)]
        self.head_values = [torch.cat([v, value_states[:, h]], dim=1) for h, v in enumerate(self.head_values)]
        ragged = RaggedKV(self.head_keys, self.head_values, self.key_channels)
        return ragged, ragged  # the attention function reads .keys of the first, .values of the second

    def key_norms(self) -> torch.Tensor:
        """‖K[:, c]‖ of every head's stored keys: (B, Hkv, D)."""
        return torch.stack([k.float().norm(dim=1) for k in self.head_keys], dim=1)

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Keep only ``channels`` (B, Hkv, Dk) of every head's keys, now and for later tokens."""
        self.head_keys = [
            select_channels(k[:, None], channels[:, h : h + 1])[:, 0]  # (B, K_h, Dk)
            for h, k in enumerate(self.head_keys)
        ]
        self.key_channels = channels

    def head_lengths(self) -> list[int]:
        return [int(k.shape[1]) for k in self.head_keys]

    def get_seq_length(self) -> int:
        return max(self.head_lengths())

    def nbytes(self) -> int:
        tensors = [*self.head_keys, *self.head_values]
        if self.key_channels is not None:
            tensors.append(self.key_channels)
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def n_pairs(self) -> int:
        return sum(self.head_lengths())

    def n_heads(self) -> int:
        return self.head_keys[0].shape[0] * len(self.head_keys)

    def batch_size(self) -> int:
        return int(self.head_keys[0].shape[0])

    def head_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.key_channels is not None:
            raise ValueError("keys with pruned channels have no full-width pairs")
        return [(k[0], v[0]) for k, v in zip(self.head_keys, self.head_values, strict=True)]

    def state(self) -> dict[str, Any]:
        return {"head_keys": self.head_keys, "head_values": self.head_values}
