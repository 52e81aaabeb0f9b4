"""kvtrim's attention function, registered once with transformers' ``AttentionInterface``.

One table maps what a cache layer hands to attention (a tensor, or a stand-in of
:mod:`kvtrim.attention.standins`) to the kernel that reads it; a new layer type adds one entry,
never an ``if``. For ordinary tensors it is plain ``sdpa``, so a model switched to it computes
exactly what it computed before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvtrim.attention.dense import dense_attention, pruned_attention
from kvtrim.attention.masked import masked_attention
from kvtrim.attention.ragged import ragged_attention
from kvtrim.attention.standins import MaskedKV, PrunedKeys, RaggedKV, WindowKV
from kvtrim.attention.window import window_attention

ATTENTION_NAME = "kvtrim_sdpa"

#: query (B, H, q, D), key, value, mask, scaling -> output (B, q, H, D)
Kernel = Callable[..., torch.Tensor]

KERNELS: dict[type, Kernel] = {
    torch.Tensor: dense_attention,
    PrunedKeys: pruned_attention,
    RaggedKV: ragged_attention,
    MaskedKV: masked_attention,
    WindowKV: window_attention,
}


def kvtrim_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: the kernel for ``type(key)``, like ``sdpa``'s output."""
    kernel = KERNELS.get(type(key), dense_attention)
    return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs), None


def register() -> None:
    """Make ``kvtrim_sdpa`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvtrim_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model: nn.Module) -> None:
    """Switch ``model`` to ``kvtrim_sdpa``: identical to sdpa on ordinary caches, so it stays on."""
    register()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
