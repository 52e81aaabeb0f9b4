"""Ratios and the counts they keep: a ratio r of T tokens evicts floor(r·T) pairs, so
``n_keep = T − floor(r·T)`` — the kept count is rounded *up*, and a layer never ends up empty
while r < 1. Plain Python (no torch), so specs and the command line can check ratios instantly.
"""

from __future__ import annotations

import math

from kvtrim.core.errors import KVTrimError


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio (fraction of pairs evicted), which must lie in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError) as err:
        raise KVTrimError(f"ratio must be a number in [0, 1), got {ratio!r}") from err
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise KVTrimError(f"ratio must be in [0, 1) (the fraction of the cache evicted), got {ratio!r}")
    return value


def check_channel_ratio(ratio: float) -> float:
    """Validate the fraction of key channels pruned (ThinK), which must lie in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError) as err:
        raise KVTrimError(f"key_channels must be a number in [0, 1), got {ratio!r}") from err
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise KVTrimError(
            f"key_channels must be in [0, 1) (the fraction of key channels pruned), got {ratio!r}"
        )
    return value


def n_keep(n_tokens: int, ratio: float) -> int:
    """Pairs kept per (layer, kv-head) out of ``n_tokens`` at ``ratio``: T − floor(r·T)."""
    return n_tokens - math.floor(ratio * n_tokens + 1e-9)


def n_keep_channels(head_dim: int, ratio: float) -> int:
    """Channels kept out of ``head_dim``: D − floor(ratio·D), as token budgets round."""
    return head_dim - math.floor(ratio * head_dim + 1e-9)
