"""The one place token ids go through the model: a forward over a cache at explicit positions.

Positions are always passed: a compressed cache is shorter than the sequence it stands for, so
transformers cannot derive true RoPE positions from its length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from kvtrim.models.adapters import model_device, text_config


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` laid out for ``model`` (sliding-window layers where it has them)."""
    return DynamicCache(config=text_config(model))


def forward(
    model: nn.Module,
    ids: torch.Tensor | list[list[int]],
    positions: torch.Tensor | None = None,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 1,
) -> Any:
    """One forward of ``ids`` (B, q) at ``positions`` (B, q); returns the model's output.

    ``cache=None`` runs without a cache (calibration); ``logits_to_keep=0`` keeps every position's
    logits (teacher-forced scoring).
    """
    device = model_device(model)
    ids = torch.as_tensor(ids, device=device)
    kwargs: dict[str, Any] = {"input_ids": ids, "logits_to_keep": logits_to_keep}
    if positions is not None:
        kwargs["position_ids"] = positions.to(device)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    if cache is None:
        kwargs["use_cache"] = False
    else:
        kwargs.update(cache=cache, use_cache=True)
    return model(**kwargs)
