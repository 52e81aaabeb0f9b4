"""PyramidKV (arXiv 2406.02069): per-layer budgets falling linearly with depth."""

from __future__ import annotations

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep
from kvtrim.core.selection import top_indices


class PyramidBudget(Budget):
    """PyramidKV: budgets fall linearly with depth, from (2 − 1/β)·avg to avg/β, averaging the
    uniform budget — lower layers attend broadly, upper layers focus on few tokens."""

    name = "pyramid"
    summary = "Per-layer budgets decreasing linearly with depth, same average as uniform (beta=20)."
    paper = "arXiv 2406.02069"
    layers_alike = False

    def __init__(self, beta: float = 20.0):
        if beta < 1:
            raise KVTrimError(f"pyramid beta must be >= 1, got {beta}")
        self.beta = beta

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int:
        average = n_keep(n_tokens, ratio)
        low = average / self.beta
        high = 2 * average - low
        if n_layers == 1 or high > n_tokens:  # no room for a pyramid: fall back to uniform
            return average
        keep = high - (high - low) * layer_idx / (n_layers - 1)
        return int(min(n_tokens, max(1, round(keep))))

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        return top_indices(scores, self.layer_keep(scores.shape[-1], layer_idx, n_layers, ratio))
