"""One-shot compression with a budget that weighs all layers together (KVCompose's global budget):
each layer is scored right after its attention ran on the prefill, and all are evicted once the
prefill is over — the cache peaks at its full size meanwhile, as for KVzip."""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.core.clock import device_time
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import LayerCall
from kvtrim.engine.eviction import Selector, evict_by_scores
from kvtrim.schedules.base import Schedule


class AcrossLayers(Schedule):
    """Score every layer on the prefill through ``selector``'s scorer; evict them all in :meth:`finish`."""

    def __init__(self, selector: Selector):
        self.selector = selector
        #: layer -> its scores (B, Hkv, T), until the prefill is over
        self.scores: dict[int, torch.Tensor] = {}

    def takes(self, call: LayerCall) -> bool:
        return call.is_first_forward

    def compress_layer(self, call: LayerCall) -> None:
        layer = call.layer
        keys = layer.keys  # (B, Hkv, T, D)
        if self.selector.evicts(keys.shape[-2]):
            view = call.view(keys, layer.values, call.key_positions(keys))
            self.scores[call.idx] = self.selector.scorer.score(view)

    def finish(self, cache: Any, n_tokens: int, stats: CompressionStats) -> CompressionStats:
        """Evict every layer by the budget's joint choice; the figures count each layer once."""
        device = next(iter(self.scores.values())).device if self.scores else None
        start = device_time(device)
        out = CompressionStats(kv_bytes_peak=stats.kv_bytes_peak)
        evict_by_scores(cache, self.scores, self.selector, out)
        self.scores = {}
        out.compress_s = stats.compress_s + device_time(device) - start
        return out
