"""One ratio per layer, given as a list: the per-layer budget curves of LU-KV (arXiv 2602.08585)
and PyramidKV-like shapes written out by hand, e.g. ``layers:ratios=[0.2,0.5,0.8]``.

A list as long as the model's layers gives each layer its ratio; a shorter one is a curve over
depth, interpolated linearly between its points (one value: every layer alike). The spec's own
ratio is ignored, so a sweep over ratios refuses this budget.
"""

from __future__ import annotations

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import check_ratio, n_keep
from kvtrim.core.selection import top_indices


class LayerRatiosBudget(Budget):
    """Layer ``l`` evicts ``ratios[l]`` of its pairs (interpolated over depth when the list is shorter)."""

    name = "layers"
    summary = "One ratio per layer from a list (interpolated over depth): layers:ratios=[0.2,0.8]."
    paper = "arXiv 2602.08585"
    layers_alike = False
    ratio_driven = False

    def __init__(self, ratios: list):
        if not isinstance(ratios, list) or not ratios:
            raise KVTrimError(
                "The layers budget needs ratios=[r0, r1, ...]: one ratio per layer, or a curve."
            )
        self.ratios = [check_ratio(r) for r in ratios]

    def layer_ratio(self, layer_idx: int, n_layers: int) -> float:
        """The ratio of layer ``layer_idx`` of ``n_layers``: its list entry, or the curve's value there."""
        points = self.ratios
        if len(points) == n_layers:
            return points[layer_idx]
        if len(points) == 1 or n_layers == 1:
            return points[0]
        where = layer_idx / (n_layers - 1) * (len(points) - 1)  # position along the curve
        low = min(int(where), len(points) - 2)
        return points[low] + (points[low + 1] - points[low]) * (where - low)

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int:
        return n_keep(n_tokens, self.layer_ratio(layer_idx, n_layers))

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        return any(n_keep(n_tokens, r) < n_tokens for r in self.ratios)

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        return top_indices(scores, self.layer_keep(scores.shape[-1], layer_idx, n_layers, ratio))
