"""One-shot compression: each layer is compressed once, right after its attention ran on the
prefill (a cache's first forward); later forwards — the question, decoded tokens — only read it."""

from __future__ import annotations

from kvtrim.engine.call import LayerCall
from kvtrim.engine.eviction import PositionTracker, Selector, evict_layer, prune_key_channels
from kvtrim.schedules.base import Schedule


class AfterPrefill(Schedule):
    """Evict through ``selector`` on a cache's prefill; ``key_channels`` also prunes that fraction
    of the key channels of every layer (ThinK, over the last ``channel_window`` context queries)."""

    def __init__(
        self,
        selector: Selector,
        positions: PositionTracker | None = None,
        key_channels: float = 0.0,
        channel_window: int = 32,
    ):
        self.selector = selector
        self.positions = positions
        self.key_channels = key_channels
        self.channel_window = channel_window

    def takes(self, call: LayerCall) -> bool:
        return call.is_first_forward

    def compress_layer(self, call: LayerCall) -> None:
        evict_layer(call, self.selector, self.positions)
        if self.key_channels:
            prune_key_channels(call, self.key_channels, self.channel_window)
