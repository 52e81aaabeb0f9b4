"""Keep what scores high enough: as many pairs as pass a threshold, head by head."""

from __future__ import annotations

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.selection import top_indices


class ThresholdBudget(Budget):
    """Keep every pair scoring at least ``threshold`` (each head keeps at least its best pair)."""

    name = "threshold"
    summary = "Keep pairs whose score is >= tau (--threshold TAU); the ratio is ignored."
    heads_alike = False
    layers_alike = False
    ratio_driven = False

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        return None

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        return True

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        mask = scores >= self.threshold  # (B, Hkv, T)
        best = top_indices(scores, 1)  # (B, Hkv, 1)
        return mask.scatter(2, best, True)
