"""CriticalKV (arXiv 2502.03805): judge a pair by what evicting it would change in the output.

Attention weights alone ignore that a pair reaches the layer's output as a·v·W_o: a heavily attended
value that W_o maps near zero matters little, a lightly attended one with a large projection can
matter a lot. The paper bounds the output perturbation of an eviction by attention × ‖v·W_o^h‖₁ and
selects in two stages, because that product alone can drop the most attended pairs:

1. the first ``first_stage`` fraction of the budget goes to the pairs with the highest base score;
2. the rest of the budget goes to the best of (base score + ε) · ‖v·W_o^h‖₁ (mean over the query
   heads h of the pair's KV group), as NVIDIA kvpress' ``CriticalKVPress`` does.

Design: one scorer, ``critical``, configured with the name of its ``base`` scorer (and
``base_options``) rather than a press wrapping a press. The refinement is then one more point on
the scorer axis, so it combines with every budget (``--budget adaptive`` gives the paper's
CriticalAdaKV) and the pipeline never sees a chain. Stage 1 needs the budget's count: the engine
passes it as ``LayerView.budget_keep`` (stage 1 is skipped when the budget has no fixed count, as
with ``threshold``); stage-1 pairs score +inf so any budget keeps them first. The default base is
SnapKV, the paper's own base; the base should score like attention (non-negative, higher = keep),
which every attention-derived scorer here does (snapkv, tova, observed-attention,
expected-attention), but not norms or projections such as knorm or qfilters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtrim.core.errors import KVTrimError
from kvtrim.core.selection import top_indices
from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.scorers.registry import make_scorer


def projected_value_norms(values: torch.Tensor, output_weight: torch.Tensor) -> torch.Tensor:
    """‖v·W_o^h‖₁ averaged over each KV head's query heads.

    values: (B, Hkv, T, D); output_weight: (H, D, hidden). Returns (B, Hkv, T). One head at a time,
    so the (T, hidden) product of only one head is ever held.
    """
    bsz, n_kv, seq, _ = values.shape
    group = output_weight.shape[0] // n_kv
    norms = torch.zeros(bsz, n_kv, seq, dtype=torch.float32, device=values.device)
    for h in range(output_weight.shape[0]):
        w = output_weight[h].to(values.device, torch.float32)  # (D, hidden)
        norms[:, h // group] += (values[:, h // group].float() @ w).abs().sum(dim=-1)  # (B, T)
    return norms / group


@dataclass
class CriticalKV(Scorer):
    """Two-stage selection: base score first, then base score × ‖v·W_o‖₁."""

    name = "critical"
    summary = "CriticalKV: half the budget by a base score (snapkv), the rest by score × ‖v·W_o‖₁."
    paper = "arXiv 2502.03805"
    uses_budget = True
    base: str = "snapkv"
    base_options: dict[str, Any] = field(default_factory=dict)
    first_stage: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.first_stage <= 1.0:
            raise KVTrimError(f"critical first_stage must be in [0, 1], got {self.first_stage}")
        if self.base == self.name:
            raise KVTrimError("critical cannot refine itself: pick another base method.")
        self._base = make_scorer(self.base, **self.base_options)
        if not self._base.evicts:
            raise KVTrimError(f"critical needs a base method that scores pairs, not {self.base!r}.")
        # chunked prefill works exactly when the base supports per-head key positions
        self.chunkable = self._base.chunkable

    def setup(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self._base.setup(model, tokenizer)

    def score(self, view: LayerView) -> torch.Tensor:
        if view.output_weight is None:
            raise KVTrimError("critical needs the attention output projection (o_proj) of this model.")
        base = self._base.score(view).float()  # (B, Hkv, T)
        norms = projected_value_norms(view.values, view.output_weight)  # (B, Hkv, T)
        # +inf base scores (sinks, windows) stay +inf even where a norm is 0
        scores = torch.where(torch.isinf(base), base, (base + self.epsilon) * norms)
        if view.budget_keep is None:
            return scores
        first = min(math.floor(self.first_stage * view.budget_keep), base.shape[-1])
        if first > 0:
            chosen = top_indices(base, first)  # (B, Hkv, first): same tie rule as the budgets
            scores = scores.scatter(2, chosen, torch.inf)
        return scores
