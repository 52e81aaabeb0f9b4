"""The engine: hooks on every attention layer hand each call to a schedule, which compresses.

Two forward hooks per layer (:mod:`kvtrim.core.hooks`): one keeps the query projection's output,
the other runs right after the layer's attention wrote its K/V into the cache. A schedule
(:mod:`kvtrim.schedules`, or a strategy's recorder) then decides what that call does — evict now,
record scores, nothing — and the next layer runs with this one already compressed, so at most one
layer's cache is uncompressed at any time. The engine itself has no modes and no flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from kvtrim.core.hooks import attention_hooks
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import ForwardPositions, LayerCall
from kvtrim.models.adapters import check_supported, hooked_layers, layer_internals


class LayerHandler(Protocol):
    """What the engine hands every attention call to (schedules, recorders)."""

    def on_forward(self, call: LayerCall) -> None: ...


class Compressor:
    """Attaches to a model and hands every attention call it sees while attached to ``schedule``."""

    def __init__(self, model: nn.Module, schedule: LayerHandler, seed: int = 0, question_tokens: int = 0):
        check_supported(model)
        self.model = model
        self.schedule = schedule
        self.seed = seed
        #: tokens of the question at the end of a one-shot prefill (query-aware compression), which
        #: scorers see as ``LayerView.question_length``
        self.question_tokens = question_tokens
        self.stats = CompressionStats()
        self._layers = hooked_layers(model)
        self._internals = layer_internals(model)
        self._positions = ForwardPositions()

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @contextmanager
    def attached(self) -> Iterator[Compressor]:
        """Register the hooks; they are removed on exit, even if the body raises.

        The scorer and the budget must be set up (``.setup(model, tokenizer)``) before the first prefill.
        """
        with attention_hooks(self._layers, on_attention=self._on_attention):
            yield self

    def _on_attention(
        self, idx: int, attn: nn.Module, kwargs: dict[str, Any], projected: torch.Tensor | None
    ):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden = kwargs.get("hidden_states")
        if cache is None or hidden is None or idx >= len(cache.layers):
            return
        internals = self._internals[idx]
        call = LayerCall(
            self.model,
            self.stats,
            self.seed,
            self.n_layers,
            idx,
            internals,
            cache,
            kwargs,
            projected,
            self.question_tokens if hidden.shape[1] > self.question_tokens else 0,  # not while decoding
            self._positions,
        )
        self.schedule.on_forward(call)
