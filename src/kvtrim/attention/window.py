"""Attention of a sliding-window layer compressed within its window (see
:class:`~kvtrim.attention.standins.WindowKV` and :mod:`kvtrim.cache.window`).

Once a head keeps only some of its window's pairs, slot indices no longer tell positions, so the
mask is built from the pairs' own positions: query t sees pair p where t − W < p ≤ t, which is
transformers' sliding-window mask restated on positions. With every pair kept it is that mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtrim.attention.standins import WindowKV


def window_mask(positions: torch.Tensor, query_positions: torch.Tensor, window: int) -> torch.Tensor:
    """positions (B, Hkv, L) of the pairs, query_positions (q,) -> (B, Hkv, q, L) visible."""
    pairs = positions[:, :, None, :]  # (B, Hkv, 1, L)
    queries = query_positions[None, None, :, None]  # (1, 1, q, 1)
    return (pairs <= queries) & (pairs > queries - window)


def window_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: WindowKV,
    value: WindowKV,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    **kwargs: Any,
) -> torch.Tensor:
    """Every (row, head) over the pairs its window shows each query; query (B, H, q, D) -> (B, q, H, D).

    The G query heads of a KV head share its keys without copying them: (B, Hkv, G·q, D) queries
    against (B, Hkv, L, D) keys, with the mask (B, Hkv, G·q, L). The model's own mask is not used:
    it describes contiguous slots.
    """
    batch, n_heads, q_len, dim = query.shape
    n_kv, length = key.keys.shape[1], key.keys.shape[2]
    group = n_heads // n_kv
    query_positions = key.positions[0, 0, -q_len:]  # (q,) the current tokens, alike in every head
    mask = window_mask(key.positions, query_positions, key.window)  # (B, Hkv, q, L)
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, n_kv, group * q_len, length)
    grouped = query.reshape(batch, n_kv, group * q_len, dim)  # head h·G + g, token t -> row g·q + t
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key.keys, value.values, attn_mask=mask, scale=scaling
    )  # (B, Hkv, G·q, Dv)
    return out.reshape(batch, n_heads, q_len, -1).transpose(1, 2).contiguous()
