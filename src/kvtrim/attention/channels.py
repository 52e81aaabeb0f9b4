"""Gathering key channels: what pruned keys are stored on, and the query channels that meet them."""

from __future__ import annotations

import torch


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
