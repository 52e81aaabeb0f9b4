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


# ---------------------------------------------------------------------------------------------
# Budget policies: (scores of one layer, layer position, ratio) -> which pairs each head keeps.
# A policy returns either dense indices (every head keeps the same count) or a boolean mask
# (heads keep different counts, stored ragged by the engine).
# ---------------------------------------------------------------------------------------------


class Budget:
    """Base class: decide the kept set of one layer from its scores."""

    name: str = ""
    summary: str = ""
    paper: str = "-"

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        """scores: (B, Hkv, T) -> (B, Hkv, K) sorted indices, or a (B, Hkv, T) boolean keep mask."""
        raise NotImplementedError

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        """False when this budget keeps everything (the engine then skips scoring)."""
        return n_keep(n_tokens, ratio) < n_tokens

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        """Pairs per head this budget keeps in the layer (their mean if heads differ), None when
        it depends on the scores themselves. Scorers see it as ``LayerView.budget_keep``."""
        return n_keep(n_tokens, ratio)


class UniformBudget(Budget):
    name = "uniform"
    summary = "Every layer and head keeps T − floor(ratio·T) pairs."

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        return top_indices(scores, n_keep(scores.shape[-1], ratio))


class TokenBudget(Budget):
    """An absolute cap: the cache never holds more than ``tokens`` pairs per (layer, head)."""

    name = "tokens"
    summary = "Every layer and head keeps at most N pairs (--budget-tokens N), whatever T."

    def __init__(self, tokens: int):
        if int(tokens) < 1:
            raise KVTrimError(f"The token budget must be >= 1, got {tokens}")
        self.tokens = int(tokens)

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        return n_tokens > self.tokens

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        return min(self.tokens, n_tokens)

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        return top_indices(scores, min(self.tokens, scores.shape[-1]))


class PyramidBudget(Budget):
    """PyramidKV: budgets fall linearly with depth, from (2 − 1/β)·avg to avg/β, averaging the
    uniform budget — lower layers attend broadly, upper layers focus on few tokens."""

    name = "pyramid"
    summary = "Per-layer budgets decreasing linearly with depth, same average as uniform (beta=20)."
    paper = "arXiv 2406.02069"

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


class AdaptiveBudget(Budget):
    """AdaKV: the layer's total budget (Hkv × uniform keep) goes to the top scores of all its heads
    jointly, each head first keeping its ``alpha`` × uniform best pairs as a safeguard."""

    name = "adaptive"
    summary = "Head-adaptive (AdaKV): joint top-k across a layer's heads, safeguard alpha=0.2 per head."
    paper = "arXiv 2407.11550"

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


class ThresholdBudget(Budget):
    """Keep every pair scoring at least ``threshold`` (each head keeps at least its best pair)."""

    name = "threshold"
    summary = "Keep pairs whose score is >= tau (--threshold TAU); the ratio is ignored."

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


BUDGETS: dict[str, type[Budget]] = {
    cls.name: cls for cls in (UniformBudget, TokenBudget, PyramidBudget, AdaptiveBudget, ThresholdBudget)
}


def make_budget(budget: str | Budget = "uniform", **options: float) -> Budget:
    """Build a budget policy from its name and options (or pass a ready one through)."""
    if isinstance(budget, Budget):
        return budget
    cls = BUDGETS.get(budget)
    if cls is None:
        raise KVTrimError(f"Unknown budget {budget!r}. Available: {', '.join(BUDGETS)}.")
    try:
        return cls(**options)
    except TypeError as err:
        raise KVTrimError(f"Bad option for budget {budget!r}: {err}") from err
