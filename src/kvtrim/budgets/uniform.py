"""The same count in every layer and head: a ratio of the context (uniform) or a cap (tokens)."""

from __future__ import annotations

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep
from kvtrim.core.selection import top_indices


class UniformBudget(Budget):
    name = "uniform"
    summary = "Every layer and head keeps T − floor(ratio·T) pairs."

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        return top_indices(scores, n_keep(scores.shape[-1], ratio))

    def per_chunk(self, n_tokens: int, ratio: float) -> Budget:
        return TokenBudget(n_keep(n_tokens, ratio))


class TokenBudget(Budget):
    """An absolute cap: the cache never holds more than ``tokens`` pairs per (layer, head)."""

    name = "tokens"
    summary = "Every layer and head keeps at most N pairs (--budget-tokens N), whatever T."
    ratio_driven = False

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

    def per_chunk(self, n_tokens: int, ratio: float) -> Budget:
        return self
