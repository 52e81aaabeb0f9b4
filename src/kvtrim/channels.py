"""ThinK (arXiv 2407.21018): store only the key channels the queries actually use.

Token eviction shortens the cache along T; ThinK shortens it along the head dimension. A key
channel c contributes Σ_c q_c·k_c to every attention logit, and the size of that contribution over
the observation window W (the last context queries) is bounded by ‖Q_W[:, c]‖·‖K[:, c]‖ — the
Frobenius norm of the channel's slice of QKᵀ. Channels with a small product barely move any logit,
so per layer and kv-head the ``D − floor(ratio·D)`` channels with the largest product are kept
(the queries of a GQA group are pooled: their window rows are stacked) and the keys are stored
as (B, Hkv, T, D_kept) plus the kept channel indices. Values are untouched.

Keys are cached after RoPE, and ThinK prunes exactly those: attention then uses the matching
channels of the post-RoPE queries, q·k over the kept channels only. Keys of later tokens (the
question, decoded tokens) are pruned to the same channels as they enter the cache, so one layer
keeps one channel set. The product is computed on the keys that are actually stored, i.e. after
token eviction, so ThinK composes with any scorer and budget.

The seam is the same as the ragged cache's: a cache layer (:class:`ChannelPrunedLayer`) whose
``update`` returns :class:`PrunedKeys`, and kvtrim's registered attention function, which
gathers the query channels before the usual ``sdpa``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvtrim.budgets import top_indices
from kvtrim.errors import KVTrimError
from kvtrim.masked import KeysStandIn


def check_channel_ratio(ratio: float) -> float:
    """Validate the fraction of key channels pruned, which must lie in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError) as err:
        raise KVTrimError(f"key_channels must be a number in [0, 1), got {ratio!r}") from err
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise KVTrimError(
            f"key_channels must be in [0, 1) (the fraction of key channels pruned), got {ratio!r}"
        )
    return value


def n_keep_channels(head_dim: int, ratio: float) -> int:
    """Channels kept out of ``head_dim``: D − floor(ratio·D), as token budgets round."""
    return head_dim - math.floor(ratio * head_dim + 1e-9)


def channel_scores(queries: torch.Tensor, key_norms: torch.Tensor) -> torch.Tensor:
    """‖Q_W[:, c]‖·‖K[:, c]‖ per kv-head and channel.

    queries: (B, H, W, D) post-RoPE window queries; key_norms: (B, Hkv, D), ‖K[:, c]‖ over the
    stored keys (a ragged layer's heads store different tokens) -> (B, Hkv, D).
    """
    bsz, n_kv, dim = key_norms.shape
    grouped = queries.float().reshape(bsz, n_kv, -1, dim)  # (B, Hkv, G·W, D): head h = j·G + g
    return grouped.norm(dim=2) * key_norms.float()  # (B, Hkv, D)


def kept_channels(queries: torch.Tensor, key_norms: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the kept channels, sorted: (B, Hkv, D_kept)."""
    return top_indices(channel_scores(queries, key_norms), n_keep_channels(key_norms.shape[-1], ratio))


def select_channels(states: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """states: (B, Hkv, L, D), channels: (B, Hkv, Dk) -> (B, Hkv, L, Dk), a new contiguous tensor."""
    index = channels[:, :, None, :].expand(-1, -1, states.shape[2], -1)  # (B, Hkv, L, Dk)
    return torch.gather(states, 3, index).contiguous()


def select_query_channels(query: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """query: (B, H, q, D), channels: (B, Hkv, Dk) -> (B, H, q, Dk), each head its kv-head's channels."""
    bsz, heads, q_len, dim = query.shape
    n_kv = channels.shape[1]
    grouped = query.reshape(bsz, n_kv, -1, dim)  # (B, Hkv, G·q, D)
    return select_channels(grouped, channels).reshape(bsz, heads, q_len, -1)  # (B, H, q, Dk)


@dataclass
class PrunedKeys(KeysStandIn):
    """What a channel-pruned layer hands to attention: keys (B, Hkv, T, Dk) and their channels."""

    keys: torch.Tensor
    channels: torch.Tensor  # (B, Hkv, Dk)


class ChannelPrunedLayer(DynamicLayer):
    """A dynamic cache layer whose keys keep only ``channels``; new keys are pruned on entry."""

    is_croppable = False

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

    def reset(self) -> None:
        raise NotImplementedError("a channel-pruned layer cannot be reset; build a new cache")
