"""A cache layer storing keys on the channels ThinK kept (:mod:`kvtrim.scorers.channels`).

Keys are cached after RoPE, and ThinK prunes exactly those: attention then uses the matching
channels of the post-RoPE queries (:func:`kvtrim.attention.dense.pruned_attention`). Keys of later
tokens (the question, decoded tokens) are pruned to the same channels as they enter the cache, so
one layer keeps one channel set. Values are untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.attention.channels import select_channels
from kvtrim.attention.standins import PrunedKeys
from kvtrim.cache.layers import DenseKVTrimLayer, tensor_bytes
from kvtrim.cache.ragged import RaggedLayer


class ChannelPrunedLayer(DenseKVTrimLayer):
    """A dense cache layer whose keys keep only ``channels``; new keys are pruned on entry."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, channels: torch.Tensor):
        super().__init__()
        self.keys = keys  # (B, Hkv, T, Dk)
        self.values = values  # (B, Hkv, T, D)
        self.key_channels = channels  # (B, Hkv, Dk)
        self.device = keys.device
        self.is_initialized = True

    @classmethod
    def prune(cls, layer: Any, channels: torch.Tensor) -> ChannelPrunedLayer:
        """A pruned copy of a dense layer's keys (B, Hkv, T, D); the values are shared."""
        return cls(select_channels(layer.keys, channels), layer.values, channels)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append new (B, Hkv, q, D) states, the keys pruned to the layer's channels."""
        self.keys = torch.cat([self.keys, select_channels(key_states, self.key_channels)], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return PrunedKeys(self.keys, self.key_channels), self.values

    def get_seq_length(self) -> int:
        return int(self.keys.shape[-2])

    def nbytes(self) -> int:
        return tensor_bytes(self.keys) + tensor_bytes(self.values) + tensor_bytes(self.key_channels)

    def head_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise ValueError("keys with pruned channels have no full-width pairs")

    def state(self) -> dict[str, Any]:
        return {"keys": self.keys, "values": self.values}


def key_channel_norms(layer: Any) -> torch.Tensor:
    """‖K[:, c]‖ over the keys a layer stores, per kv-head: (B, Hkv, D) (what ThinK weighs)."""
    if isinstance(layer, RaggedLayer):
        return layer.key_norms()
    return layer.keys.float().norm(dim=2)


def prune_channels(layer: Any, channels: torch.Tensor) -> Any:
    """The layer with its keys kept on ``channels`` (B, Hkv, Dk): a ragged layer prunes itself, a
    dense one becomes a :class:`ChannelPrunedLayer`."""
    if isinstance(layer, RaggedLayer):
        layer.prune_key_channels(channels)
        return layer
    return ChannelPrunedLayer.prune(layer, channels)
