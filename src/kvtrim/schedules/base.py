"""When to compress: a schedule handles every attention call the engine sees.

Each schedule says which forwards it compresses (``takes``) and what compressing a layer is
(``compress_layer``); the engine's shared bookkeeping (sliding-window layers, peak bytes, timing)
wraps every step. ``finish`` runs once the prefill is over and gives the compression's figures.
"""

from __future__ import annotations

from typing import Any

from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import LayerCall


class Schedule:
    """Base class: compress the layers of the forwards this schedule takes."""

    def on_forward(self, call: LayerCall) -> None:
        if self.takes(call):
            call.compress(self.compress_layer)

    def takes(self, call: LayerCall) -> bool:
        """Whether this forward compresses the call's layer."""
        raise NotImplementedError

    def compress_layer(self, call: LayerCall) -> None:
        raise NotImplementedError

    def finish(self, cache: Any, n_tokens: int, stats: CompressionStats) -> CompressionStats:
        """The figures once the prefill of ``n_tokens`` is done (default: those counted)."""
        return stats
