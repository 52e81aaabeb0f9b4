"""LU-KV (arXiv 2602.08585): each layer and head keeps its calibrated share of a global budget.

The curves (:mod:`kvtrim.calibration.budget_curves`, computed once per model on local text and
cached; ``kvtrim calibrate --what lukv`` computes them ahead) give, for every overall ratio, the
share of its pairs each (layer, kv-head) keeps where the pairs are worth most. At ratio r a head
of layer l keeps round(curve[r, l, h] · T) of its best pairs by the scorer's scores (at least
one), the curve interpolated linearly between the calibrated ratios (0.01 … 0.99; ratio 0 keeps
all). Over the calibration text the kept pairs average 1 − r; on other text, about that.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.budgets.base import Budget
from kvtrim.calibration.budget_curves import load_or_compute_lukv
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import read_text


def curve_at(curves: torch.Tensor, ratio: float) -> torch.Tensor:
    """curves (99, L, Hkv) at ratios 0.01 … 0.99 -> (L, Hkv) shares kept at ``ratio`` (linear
    between grid points, towards 1 below 0.01, the last row beyond 0.99)."""
    where = ratio * 100 - 1  # the (fractional) row of ``ratio``
    if where <= 0:
        low, high, t = torch.ones_like(curves[0]), curves[0], ratio * 100
        return low + (high - low) * t
    if where >= len(curves) - 1:
        return curves[-1]
    row = int(where)
    t = where - row
    return curves[row] + (curves[row + 1] - curves[row]) * t


class LUKVBudget(Budget):
    """Per-(layer, head) shares of the pairs, calibrated so the global budget goes where it is worth most."""

    name = "lukv"
    summary = "LU-KV: per-layer and per-head budget curves, calibrated locally on KVzip's utility."
    paper = "arXiv 2602.08585"
    heads_alike = False
    layers_alike = False

    def __init__(self, calibration_text: str | None = None, curves: Any = None):
        self.calibration_text = calibration_text
        self.curves: torch.Tensor | None = None if curves is None else torch.as_tensor(curves).float()

    def setup(self, model: torch.nn.Module, tokenizer: Any) -> None:
        if self.curves is None:
            texts = [read_text(self.calibration_text, "Calibration text")] if self.calibration_text else None
            self.curves = load_or_compute_lukv(model, tokenizer, texts=texts)["curves"]

    def head_counts(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        """(Hkv,) pairs each head of the layer keeps."""
        if self.curves is None:
            raise RuntimeError("LUKVBudget.setup() must run before selecting (compress() does it).")
        if self.curves.shape[1] != n_layers:
            raise KVTrimError(
                f"The LU-KV curves {tuple(self.curves.shape)} do not fit this model ({n_layers} layers): "
                "recompute them with `kvtrim calibrate --what lukv`."
            )
        shares = curve_at(self.curves, ratio)[layer_idx]  # (Hkv,)
        return (shares * n_tokens).round().long().clamp(1, n_tokens)

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int:
        return round(float(self.head_counts(n_tokens, layer_idx, n_layers, ratio).float().mean()))

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        counts = self.head_counts(scores.shape[-1], layer_idx, n_layers, ratio).to(scores.device)  # (Hkv,)
        if counts.shape[0] != scores.shape[1]:
            raise KVTrimError(
                f"The LU-KV curves have {counts.shape[0]} kv-heads per layer, the model {scores.shape[1]}: "
                "recompute them with `kvtrim calibrate --what lukv`."
            )
        order = scores.float().argsort(dim=-1, descending=True, stable=True)  # (B, Hkv, T)
        ranks = order.argsort(dim=-1)  # (B, Hkv, T): 0 = the head's best
        return ranks < counts[None, :, None]  # (B, Hkv, T) keep mask
