"""The engine: hooks that hand every attention call to a schedule, and what compressing a layer does."""

from kvtrim.engine.call import LayerCall
from kvtrim.engine.compressor import Compressor, LayerHandler
from kvtrim.engine.eviction import PositionTracker, Selector, evict_layer, keep_choice, prune_key_channels

__all__ = [
    "Compressor",
    "LayerCall",
    "LayerHandler",
    "PositionTracker",
    "Selector",
    "evict_layer",
    "keep_choice",
    "prune_key_channels",
]
