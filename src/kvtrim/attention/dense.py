"""Attention over ordinary key and value tensors, and over keys pruned to some channels (ThinK)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvtrim.attention.channels import select_query_channels
from kvtrim.attention.standins import PrunedKeys


def suffix_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(q, kv) boolean mask for [kept context | q new tokens]: context visible, new tokens causal."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return cols <= kv_len - q_len + rows


def dense_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``sdpa``, with the causal mask rebuilt when this layer's cache is longer or
    shorter than the one the model's mask was made for (per-layer budgets such as pyramid): the
    layout is always [kept context | new tokens]. query (B, H, q, D) -> (B, q, H, D)."""
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = suffix_causal_mask(query.shape[2], key.shape[-2], query.device)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]


def pruned_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: PrunedKeys,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    **kwargs: Any,
) -> torch.Tensor:
    """q·k over the kept channels of the post-RoPE query, scaled as the full head would be."""
    query = select_query_channels(query, key.channels)  # (B, H, q, Dk)
    return dense_attention(module, query, key.keys, value, attention_mask, scaling, **kwargs)
