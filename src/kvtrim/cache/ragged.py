"""Ragged cache layers: each KV head stores only its own kept pairs.

Head-adaptive and threshold budgets keep a different number of pairs per head. Padding every head
to the longest and masking (what other libraries do) frees no memory. Here the kept pairs are
packed head after head into one (ΣK_h, D) tensor for keys and one for values, with each head's
length; the tokens that come after compression (question, decoded tokens) reach every head, so
they are kept apart as ordinary dense (1, Hkv, n, D) tensors. The layer holds exactly its pairs,
and a decoding step appends to the small dense part only, never copying the kept pairs (which a
dense layer's concatenation does every step); attention merges the two parts
(:mod:`kvtrim.attention.ragged`).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.attention.channels import select_channels
from kvtrim.attention.standins import RaggedKV
from kvtrim.cache.layers import KVTrimLayer, tensor_bytes


class RaggedLayer(KVTrimLayer):
    """A cache layer whose heads hold different numbers of pairs (B = 1)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: list[int]):
        super().__init__()
        self.keys = keys  # (ΣK_h, D) head after head, or (ΣK_h, Dk) once channels are pruned
        self.values = values  # (ΣK_h, Dv)
        self.lengths = lengths  # Hkv × K_h
        self.heads = _head_views(keys, values, lengths)
        self.added_keys = keys.new_empty(1, len(lengths), 0, keys.shape[-1])  # (1, Hkv, n, D)
        self.added_values = values.new_empty(1, len(lengths), 0, values.shape[-1])
        self.key_channels: torch.Tensor | None = None  # (1, Hkv, Dk) kept key channels (ThinK)
        self.device = keys.device
        self.is_initialized = True

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> RaggedLayer:
        """keys, values: (1, Hkv, T, D); mask: (1, Hkv, T) -> the kept pairs packed head after head."""
        if keys.shape[0] != 1:
            raise NotImplementedError("ragged (per-head) budgets support batch size 1")
        lengths = mask[0].sum(dim=-1).tolist()  # (Hkv,)
        return cls(keys[0][mask[0]], values[0][mask[0]], lengths)  # (ΣK_h, D), positions in order

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append new (1, Hkv, q, D) states for every head; returns a :class:`RaggedKV` twice."""
        if self.key_channels is not None:
            key_states = select_channels(key_states, self.key_channels)  # (1, Hkv, q, Dk)
        self.added_keys = torch.cat([self.added_keys, key_states], dim=2)  # (1, Hkv, n + q, D)
        self.added_values = torch.cat([self.added_values, value_states], dim=2)
        ragged = RaggedKV(
            self.keys,
            self.values,
            self.lengths,
            self.heads,
            self.added_keys,
            self.added_values,
            self.key_channels,
        )
        return ragged, ragged  # the attention function reads .keys of the first, .values of the second

    def _per_head(self, packed: torch.Tensor, added: torch.Tensor) -> list[torch.Tensor]:
        """Hkv × (K_h + n, D): each head's kept pairs then its added ones (a copy once tokens were added)."""
        heads = packed.split(self.lengths)
        if added.shape[2] == 0:
            return list(heads)
        return [torch.cat([head, added[0, h]]) for h, head in enumerate(heads)]

    @property
    def head_keys(self) -> list[torch.Tensor]:
        """Each head's keys: Hkv × (1, K_h + n, D)."""
        return [k[None] for k in self._per_head(self.keys, self.added_keys)]

    @property
    def head_values(self) -> list[torch.Tensor]:
        return [v[None] for v in self._per_head(self.values, self.added_values)]

    def key_norms(self) -> torch.Tensor:
        """‖K[:, c]‖ of every head's stored keys: (1, Hkv, D)."""
        return torch.stack([k.float().norm(dim=0) for k in self._per_head(self.keys, self.added_keys)])[None]

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Keep only ``channels`` (1, Hkv, Dk) of every head's keys, now and for later tokens."""
        per_pair = channels[0].repeat_interleave(torch.tensor(self.lengths, device=channels.device), dim=0)
        self.keys = torch.gather(self.keys, 1, per_pair)  # (ΣK_h, Dk), each pair its head's channels
        self.heads = _head_views(self.keys, self.values, self.lengths)
        self.added_keys = select_channels(self.added_keys, channels)
        self.key_channels = channels

    def head_lengths(self) -> list[int]:
        return [length + self.added_keys.shape[2] for length in self.lengths]

    def get_seq_length(self) -> int:
        return max(self.head_lengths())

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.added_keys, self.added_values, self.key_channels)
        return sum(tensor_bytes(t) for t in tensors)

    def n_pairs(self) -> int:
        return sum(self.head_lengths())

    def n_heads(self) -> int:
        return len(self.lengths)

    def batch_size(self) -> int:
        return 1

    def head_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.key_channels is not None:
            raise ValueError("keys with pruned channels have no full-width pairs")
        keys, values = (
            self._per_head(self.keys, self.added_keys),
            self._per_head(self.values, self.added_values),
        )
        return list(zip(keys, values, strict=True))

    def state(self) -> dict[str, Any]:
        names = ("keys", "values", "lengths", "heads", "added_keys", "added_values", "key_channels")
        return {name: getattr(self, name) for name in names}


def _head_views(
    keys: torch.Tensor, values: torch.Tensor, lengths: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each head's kept pairs as (1, 1, K_h, D) views of the packed tensors, made once per layer."""
    return [
        (k[None, None], v[None, None])
        for k, v in zip(keys.split(lengths), values.split(lengths), strict=True)
    ]
