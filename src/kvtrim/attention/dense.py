"""Attention over ordinary key and value tensors (keeping its log-sum-exp when asked, for KVzip),
and over keys pruned to some channels (ThinK)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvtrim.attention.channels import select_query_channels
from kvtrim.attention.partial import attend, merge
from kvtrim.attention.standins import PrunedKeys

#: while set, dense attention calls also leave their log-sum-exp here, per attention module
_LSE_SINK: ContextVar[dict[nn.Module, torch.Tensor] | None] = ContextVar("kvtrim_lse_sink", default=None)


@contextmanager
def keeping_log_sum_exp() -> Iterator[dict[nn.Module, torch.Tensor]]:
    """While active, every dense attention call stores the log-sum-exp of its scaled scores,
    (B, H, q), under its module: what a scorer needs to turn recomputed logits into the exact
    softmax weights the model used, without recomputing the softmax over all keys (KVzip)."""
    sink: dict[nn.Module, torch.Tensor] = {}
    token = _LSE_SINK.set(sink)
    try:
        yield sink
    finally:
        _LSE_SINK.reset(token)


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
    sink = _LSE_SINK.get()
    if sink is not None:
        return _attention_keeping_lse(module, query, key, value, attention_mask, scaling, sink)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]


def _attention_keeping_lse(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    sink: dict[nn.Module, torch.Tensor],
) -> torch.Tensor:
    """``sdpa``'s attention (on CPU the very kernel it runs) that also keeps its log-sum-exp.

    The usual layout, [cached context, all visible | the q new tokens, causal], runs as two calls
    merged by log-sum-exp, neither with a mask: the context part unmasked, the new tokens' part
    causal, which skips the masked half instead of computing and hiding it. Other masks (padding,
    sliding windows) take one masked call.
    """
    q_len, kv_len = query.shape[2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    visible = attention_mask
    if visible is not None and visible.dtype != torch.bool:
        visible = visible == 0  # an additive float mask: 0 where visible
    if 1 < q_len < kv_len and query.shape[0] == 1 and _is_suffix_causal(visible, q_len, kv_len):
        context = attend(query, key[:, :, : kv_len - q_len], value[:, :, : kv_len - q_len], scale)
        new = attend(query, key[:, :, kv_len - q_len :], value[:, :, kv_len - q_len :], scale, causal=True)
        out, lse = merge(context, new), torch.logaddexp(context.lse, new.lse)
    else:
        if visible is None and q_len > 1:
            visible = suffix_causal_mask(q_len, kv_len, query.device)
        out, lse = attend(query, key, value, scale, visible)
    sink[module] = lse
    return out.transpose(1, 2).contiguous()


def _is_suffix_causal(visible: torch.Tensor | None, q_len: int, kv_len: int) -> bool:
    """Whether a (q, kv) or (1, 1, q, kv) mask is exactly [context visible | new tokens causal]."""
    if visible is None:
        return True  # transformers leaves the mask out when it is the causal one
    if visible.dim() == 4 and visible.shape[:2] != (1, 1):
        return False
    return bool(
        torch.equal(visible.reshape(q_len, kv_len), suffix_causal_mask(q_len, kv_len, visible.device))
    )


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
