"""One-shot compression: each layer is compressed once, right after its attention ran on the
prefill (a cache's first forward); later forwards — the question, decoded tokens — only read it."""

from __future__ import annotations

from kvtrim.core.errors import KVTrimError
from kvtrim.engine.call import LayerCall
from kvtrim.engine.eviction import (
    PositionTracker,
    Selector,
    evict_layer,
    evict_window,
    prune_key_channels,
    rerotate_keys,
)
from kvtrim.schedules.base import Schedule


class AfterPrefill(Schedule):
    """Evict through ``selector`` on a cache's prefill; ``key_channels`` also prunes that fraction
    of the key channels of every layer (ThinK, over the last ``channel_window`` context queries);
    ``rerotate`` then moves every layer's kept keys to positions 0..K−1 (needs ``positions``);
    ``windows`` compresses sliding-window layers too, within their window."""

    def __init__(
        self,
        selector: Selector,
        positions: PositionTracker | None = None,
        key_channels: float = 0.0,
        channel_window: int = 32,
        rerotate: bool = False,
        windows: bool = False,
    ):
        self.selector = selector
        self.positions = PositionTracker() if rerotate and positions is None else positions
        self.rerotate = rerotate
        self.windows = windows
        self.key_channels = key_channels
        self.channel_window = channel_window

    def takes(self, call: LayerCall) -> bool:
        return call.is_first_forward

    def on_forward(self, call: LayerCall) -> None:
        if self.rerotate and call.is_sliding and self.takes(call):
            raise KVTrimError(
                "Key re-rotation needs every layer to keep the same pairs' count; this model's "
                "sliding-window layers keep their window instead. Compress without /rerotate."
            )
        if self.windows and call.is_sliding and self.takes(call):
            call.compress(lambda c: evict_window(c, self.selector), windows=True)
            return
        super().on_forward(call)

    def compress_layer(self, call: LayerCall) -> None:
        evict_layer(call, self.selector, self.positions)
        if self.rerotate:
            assert self.positions is not None
            rerotate_keys(call, self.positions)
        if self.key_channels:
            prune_key_channels(call, self.key_channels, self.channel_window)
