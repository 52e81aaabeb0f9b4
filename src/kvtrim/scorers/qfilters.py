"""Q-Filters (arXiv 2503.02812): project keys on the dominant direction of the queries.

Queries and keys of a head share a dominant direction u (the first right singular vector of the
head's post-RoPE queries, oriented so that most queries project positively on it). Since
qᵀk ≈ (qᵀu)(uᵀk) along that direction, keys with a large ⟨u, k⟩ draw the most attention. The
filters are context-agnostic: computed once per model from local text (:mod:`kvtrim.calibration`)
and cached on disk, never downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtrim.calibration import load_or_compute_qfilters
from kvtrim.core.files import read_text
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class QFilters(Scorer):
    """Score = ⟨filter, k⟩ with one calibrated filter per (layer, kv-head)."""

    name = "qfilters"
    summary = "Project keys on the dominant query direction (filters calibrated locally, cached)."
    paper = "arXiv 2503.02812"
    chunkable = True
    calibration_text: str | None = None
    filters: torch.Tensor | None = field(default=None, repr=False)  # (L, Hkv, D)

    def setup(self, model: torch.nn.Module, tokenizer: object) -> None:
        if self.filters is None:
            texts = [read_text(self.calibration_text, "Calibration text")] if self.calibration_text else None
            self.filters = load_or_compute_qfilters(model, tokenizer, texts=texts)

    def score(self, view: LayerView) -> torch.Tensor:
        if self.filters is None:
            raise RuntimeError("QFilters.setup() must run before scoring (the engine does it).")
        filt = self.filters[view.layer_idx].to(view.keys.device, torch.float32)  # (Hkv, D)
        return torch.einsum("bhtd,hd->bht", view.keys.float(), filt)
