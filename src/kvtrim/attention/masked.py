"""Attention of a batch of cells: each (row, head) over its own visible slots (see
:class:`~kvtrim.attention.standins.MaskedKV` and :mod:`kvtrim.strategies.cell_batch`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtrim.attention.standins import MaskedKV


def masked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: MaskedKV,
    value: MaskedKV,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    **kwargs: Any,
) -> torch.Tensor:
    """Attention of every (row, head) over its visible slots; the new tokens are causal.

    query: (B, H, q, D) -> (B, q, H, D), like sdpa's output after its transpose. The G query heads
    of a KV head share its keys without copying them: (B, Hkv, G·q, D) queries against
    (B, Hkv, L, D) keys, with the mask (B, Hkv, G·q, L).
    """
    q_len, length = query.shape[2], key.keys.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None]
    causal = torch.arange(length, device=query.device)[None, :] <= length - q_len + rows  # (q, L)
    mask = key.visible[:, :, None, :] & causal[None, None]  # (B, Hkv, q, L)
    return grouped_attention(query, key.keys, value.values, mask, scaling)


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """query (B, H, q, D) over keys / values (B, Hkv, L, D) with a per-KV-head mask (B, Hkv, q, L)
    -> (B, q, H, Dv). The G query heads of a KV head share its keys without copying them:
    (B, Hkv, G·q, D) queries against (B, Hkv, L, D) keys, with the mask (B, Hkv, G·q, L)."""
    batch, n_heads, q_len, dim = query.shape
    n_kv, length = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, n_kv, group * q_len, length)
    grouped = query.reshape(batch, n_kv, group * q_len, dim)  # head h·G + g, token t -> row g·q + t
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=mask, scale=scaling
    )  # (B, Hkv, G·q, Dv)
    return out.reshape(batch, n_heads, q_len, -1).transpose(1, 2).contiguous()
