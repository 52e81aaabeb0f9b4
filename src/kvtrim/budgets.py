"""How many pairs to keep and which: the budget axis.

Rounding: a ratio r of T tokens evicts floor(r·T) pairs, so ``n_keep = T − floor(r·T)`` — the kept
count is rounded *up*, and a layer never ends up empty while r < 1.
"""

from __future__ import annotations

import math

import torch

from kvtrim.errors import KVTrimError


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio (fraction of pairs evicted), which must lie in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError) as err:
        raise KVTrimError(f"ratio must be a number in [0, 1), got {ratio!r}") from err
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise KVTrimError(f"ratio must be in [0, 1) (the fraction of the cache evicted), got {ratio!r}")
    return value


def n_keep(n_tokens: int, ratio: float) -> int:
    """Pairs kept per (layer, kv-head) out of ``n_tokens`` at ``ratio``: T − floor(r·T)."""
    return n_tokens - math.floor(ratio * n_tokens + 1e-9)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per (batch, head), sorted by position.

    scores: (B, H, T) -> (B, H, k). Deterministic: among equal scores the most recent position wins.
    """
    seq = scores.shape[-1]
    flipped = scores.float().flip(-1)  # position T-1 first, so a stable sort prefers recent ties
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices[..., :k]
    return (seq - 1 - order).sort(dim=-1).values
