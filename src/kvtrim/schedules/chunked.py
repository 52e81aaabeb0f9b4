"""Chunked prefill: the context goes in N tokens at a time and every layer is evicted down to the
final budget after every chunk, so the cache never holds more than that budget + N pairs per
layer and head, whatever the context length. Later chunks attend to the compressed cache of
earlier ones, so results differ from one-shot compression, which sees the whole context first.
"""

from __future__ import annotations

from typing import Any

from kvtrim.cache.layers import is_sliding, layer_bytes, layer_heads
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import LayerCall
from kvtrim.engine.eviction import PositionTracker, Selector, evict_layer
from kvtrim.schedules.base import Schedule


class Chunked(Schedule):
    """Evict through ``selector`` (a fixed token budget) after every forward of the prefill."""

    def __init__(self, selector: Selector, positions: PositionTracker | None = None):
        self.selector = selector
        self.positions = positions if positions is not None else PositionTracker()
        self.prefilling = True

    def takes(self, call: LayerCall) -> bool:
        return self.prefilling

    def compress_layer(self, call: LayerCall) -> None:
        evict_layer(call, self.selector, self.positions)

    def finish(self, cache: Any, n_tokens: int, stats: CompressionStats) -> CompressionStats:
        """'Before' is the uncompressed cache of all ``n_tokens``; the chunks' own counts are dropped."""
        self.prefilling = False
        final = CompressionStats(compress_s=stats.compress_s, kv_bytes_peak=stats.kv_bytes_peak)
        for layer in cache.layers:
            keys = layer.keys  # (B, Hkv, K, D)
            heads = layer_heads(layer)
            seq = keys.shape[2] if is_sliding(layer) else n_tokens
            pair_bytes = 2 * keys.shape[-1] * keys.element_size()
            final.add_layer(seq * heads * pair_bytes, layer_bytes(layer), seq, keys.shape[2], heads)
            final.layers_compressed += 1
        return final
