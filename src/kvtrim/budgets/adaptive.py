"""AdaKV (arXiv 2407.11550): one layer's budget shared by its heads, by their joint top scores."""

from __future__ import annotations

import math

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep
from kvtrim.core.selection import top_indices


class AdaptiveBudget(Budget):
    """AdaKV: the layer's total budget (Hkv × uniform keep) goes to the top scores of all its heads
    jointly, each head first keeping its ``alpha`` × uniform best pairs as a safeguard."""

    name = "adaptive"
    summary = "Head-adaptive (AdaKV): joint top-k across a layer's heads, safeguard alpha=0.2 per head."
    paper = "arXiv 2407.11550"
    heads_alike = False
    layers_alike = False

    def __init__(self, alpha: float = 0.2):
        if not 0 <= alpha <= 1:
            raise KVTrimError(f"adaptive alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        bsz, heads, seq = scores.shape
        keep = n_keep(seq, ratio)
        safeguard = math.floor(self.alpha * keep)
        boosted = scores.float().clone()
        if safeguard:
            guaranteed = top_indices(scores, safeguard)  # (B, Hkv, safeguard)
            boosted.scatter_(2, guaranteed, torch.inf)
        flat = boosted.reshape(bsz, 1, heads * seq)  # (B, 1, Hkv·T)
        chosen = top_indices(flat, heads * keep)[:, 0]  # (B, Hkv·keep)
        mask = torch.zeros(bsz, heads * seq, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, chosen, True)
        return mask.view(bsz, heads, seq)  # (B, Hkv, T)
