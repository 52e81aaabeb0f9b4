"""KVzip as the teacher of the learned surrogates (:mod:`kvtrim.calibration.surrogates`): the
hidden states and KVzip scores of every full-attention layer over one text.

Registered at import (``kvtrim.strategies`` imports this module), so the calibration layer can
fit KVzap without importing the strategies that run KVzip's reconstruction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtrim.calibration.surrogates import register_teacher
from kvtrim.engine.compressor import Compressor
from kvtrim.generation import prefill
from kvtrim.models.adapters import hooked_layers
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import encode_context
from kvtrim.scorers.kvzip import KVzip
from kvtrim.strategies.reconstruction import keep_everything, score_by_reconstruction


@torch.inference_mode()
def kvzip_teacher(
    model: nn.Module, tokenizer: Any, text: str, seed: int = 0
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per full-attention layer: its input hidden states (T, F) and KVzip's scores (Hkv, T) of ``text``."""
    layout, ids = encode_context(model, tokenizer, text, False)
    hidden: dict[int, torch.Tensor] = {}
    handles = []
    for idx, (attention, _) in enumerate(hooked_layers(model)):

        def grab(_module: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            states = kwargs.get("hidden_states", args[0] if args else None)  # (1, T, F)
            hidden.setdefault(idx, states[0].detach().float().cpu())

        handles.append(attention.register_forward_pre_hook(grab, with_kwargs=True))
    cache = new_cache(model)
    try:
        with Compressor(model, keep_everything(), seed=seed).attached():
            prefill(model, cache, [ids])
    finally:
        for handle in handles:
            handle.remove()
    scores, _ = score_by_reconstruction(model, tokenizer, cache, KVzip(), layout, text, len(ids), seed)
    return {idx: (hidden[idx], layer_scores[0].float().cpu()) for idx, layer_scores in scores.items()}


register_teacher("kvzip", kvzip_teacher)
