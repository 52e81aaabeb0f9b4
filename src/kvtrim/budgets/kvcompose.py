"""KVCompose (arXiv 2509.05165): composite tokens, and one budget for the whole model.

Each head ranks its own pairs; the j-th *composite token* of a layer is the j-th best pair of
every head (heads keep their own pairs, the layer keeps one shared count: a dense cache), scored
by the mean over heads of those pairs' scores. All layers' composite tokens then compete for the
model's budget — as many pairs as the uniform budget keeps in total — so a layer whose heads
have more to lose keeps more. Scores must be comparable across layers (attention weights are:
``snapkv``, ``tova``, ``observed-attention``, ``kvzip``, ...). Layers are scored during the prefill
and evicted once all are (the cache peaks at its full size meanwhile); one context at a time.
"""

from __future__ import annotations

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep
from kvtrim.core.selection import top_indices


def composite_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (1, Hkv, T) -> (composite scores (T,) non-increasing, each head's order (1, Hkv, T))."""
    ranked, order = scores.float().sort(dim=-1, descending=True, stable=True)  # (1, Hkv, T)
    return ranked[0].mean(dim=0), order  # (T,): the j-th composite token's score


class KVComposeBudget(Budget):
    """The model's pairs go to the best composite tokens of all layers; heads of a layer keep as many."""

    name = "kvcompose"
    summary = "KVCompose: composite tokens (each head's j-th best) compete across all layers for one budget."
    paper = "arXiv 2509.05165"
    layers_alike = False
    spans_layers = True

    def __init__(self, min_keep: int = 1):
        if min_keep < 1:
            raise KVTrimError(f"min_keep must be >= 1 pair per head, got {min_keep}.")
        self.min_keep = int(min_keep)

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        return None  # decided with every layer's scores

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        raise RuntimeError("the kvcompose budget chooses for all layers at once: use select_layers")

    def select_layers(self, scores: dict[int, torch.Tensor], ratio: float) -> dict[int, torch.Tensor]:
        if any(s.shape[0] != 1 for s in scores.values()):
            raise KVTrimError("The kvcompose budget compresses one context at a time.")
        layers = sorted(scores)
        composites = {idx: composite_scores(scores[idx]) for idx in layers}
        total = sum(n_keep(scores[idx].shape[-1], ratio) for idx in layers)
        floors = {idx: min(self.min_keep, scores[idx].shape[-1]) for idx in layers}
        # every layer keeps its floor; the rest of the budget goes to the best remaining composites
        rest = torch.cat([composites[idx][0][floors[idx] :] for idx in layers])  # (Σ T_l − floors,)
        owner = torch.cat(
            [torch.full((scores[idx].shape[-1] - floors[idx],), i) for i, idx in enumerate(layers)]
        )
        n_rest = max(0, min(len(rest), total - sum(floors.values())))
        won = owner[top_indices(rest[None, None], n_rest)[0, 0].cpu()] if n_rest else owner[:0]
        extra = torch.bincount(won, minlength=len(layers))  # (L',) composites won per layer
        out = {}
        for i, idx in enumerate(layers):
            keep = floors[idx] + int(extra[i])
            out[idx] = composites[idx][1][..., :keep].sort(dim=-1).values  # (1, Hkv, K_l) sorted
        return out
