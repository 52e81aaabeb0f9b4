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

from kvtrim.attention.masked import grouped_attention
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

    The model's own mask is not used: it describes contiguous slots.
    """
    q_len = query.shape[2]
    query_positions = key.positions[0, 0, -q_len:]  # (q,) the current tokens, alike in every head
    mask = window_mask(key.positions, query_positions, key.window)  # (B, Hkv, q, L)
    return grouped_attention(query, key.keys, value.values, mask, scaling)
