"""Keep what scores high enough: as many pairs as pass a threshold, head by head.

With ``window`` > 0 the latest ``window`` pairs are kept whatever they score: DMS's delayed
eviction (arXiv 2506.05345), which lets a pair be judged only once later tokens could have used
it — the inference rule KVzap is paired with (``kvzap+threshold:threshold=T:window=W``).
"""

from __future__ import annotations

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.selection import top_indices


class ThresholdBudget(Budget):
    """Keep every pair scoring at least ``threshold`` (each head keeps at least its best pair), and
    the last ``window`` pairs."""

    name = "threshold"
    summary = "Keep pairs scoring >= tau (--threshold TAU), and the last `window` ones; ratio ignored."
    heads_alike = False
    layers_alike = False
    ratio_driven = False

    def __init__(self, threshold: float, window: int = 0):
        if window < 0:
            raise KVTrimError(f"window must be >= 0 pairs, got {window}.")
        self.threshold = float(threshold)
        self.window = int(window)

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        return None

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        return True

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        mask = scores >= self.threshold  # (B, Hkv, T)
        if self.window:
            mask[..., -self.window :] = True  # DMS: the latest pairs are not judged yet
        best = top_indices(scores, 1)  # (B, Hkv, 1)
        return mask.scatter(2, best, True)
