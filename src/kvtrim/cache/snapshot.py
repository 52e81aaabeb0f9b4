"""Zero-copy snapshots of a cache, to put it back after a question.

``DynamicCache.update`` concatenates into *new* tensors (and kvtrim's layers do the same), so
holding the old ones is enough to restore the cache: no copy is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtrim.cache.layers import layer_state, restore_layer


@dataclass
class CacheSnapshot:
    """The layers of a cache and references to their tensors and counters."""

    layers: list[Any]
    states: list[dict[str, Any]]

    @classmethod
    def take(cls, cache: Any) -> CacheSnapshot:
        return cls(list(cache.layers), [layer_state(layer) for layer in cache.layers])

    def restore(self, cache: Any) -> None:
        cache.layers[:] = self.layers
        for layer, state in zip(self.layers, self.states, strict=True):
            restore_layer(layer, state)
