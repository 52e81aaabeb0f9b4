"""How many pairs to keep and which: the budget axis.

Rounding: a ratio r of T tokens evicts floor(r·T) pairs, so ``n_keep = T − floor(r·T)`` — the kept
count is rounded *up*, and a layer never ends up empty while r < 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvtrim.errors import KVTrimError
from kvtrim.specs import parse_spec


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

    def setup(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Prepare model-specific data once (e.g. a calibrated head split); default: nothing."""

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


class DuoBudget(Budget):
    """DuoAttention: retrieval heads keep the whole context, streaming heads only their first
    ``sinks`` and last ``window`` pairs.

    Which heads retrieve is calibrated once per model on a local passkey text
    (:func:`kvtrim.calibration.load_or_compute_duo_heads`) and ranked across all full-attention
    layers, as the paper ranks its gates globally. The ratio sets how many heads retrieve: with
    S = sinks + window (capped at T), retrieval heads keep T pairs and streaming heads S, so the
    fraction of retrieval heads is f = ((1 − ratio)·T − S) / (T − S), clipped to [0, 1] — the cache
    then holds (1 − ratio)·T pairs per head on average, as the uniform budget does, except that
    f = 0 (a short context or a high ratio) cannot go below S per head.

    ``retrieval=F`` fixes the fraction of retrieval heads instead; they then share what the
    streaming heads leave of the budget, (1 − ratio)·T·N − S·(streaming heads), keeping their
    best pairs by the method's scores (DuoAttention combined with any scorer). Otherwise the
    scores are not used and any method gives the same cache (``streaming-llm`` is the cheapest).
    """

    name = "duo"
    summary = "DuoAttention: calibrated retrieval heads keep all, streaming heads sinks + window (64+256)."
    paper = "arXiv 2410.10819"

    def __init__(
        self,
        sinks: int = 64,
        window: int = 256,
        retrieval: float | None = None,
        heads: torch.Tensor | None = None,
        full_layers: list[bool] | None = None,
    ):
        if sinks < 0 or window < 1:
            raise KVTrimError(f"duo needs sinks >= 0 and window >= 1, got {sinks} and {window}")
        if retrieval is not None and not 0.0 <= retrieval <= 1.0:
            raise KVTrimError(
                f"duo retrieval (fraction of retrieval heads) must be in [0, 1], got {retrieval}"
            )
        self.sinks, self.window, self.retrieval = int(sinks), int(window), retrieval
        self.heads: torch.Tensor | None = None  # (L, Hkv) retrieval scores
        self.rank: torch.Tensor | None = None  # (L, Hkv): 0 = most retrieval-like head
        self.n_heads = 0  # KV heads of the full-attention layers, all layers together
        if heads is not None:
            self.set_heads(heads, full_layers)

    def set_heads(self, heads: torch.Tensor, full_layers: list[bool] | None = None) -> None:
        """Rank the (L, Hkv) retrieval scores over the full-attention layers (ties: earlier first)."""
        heads = heads.float().cpu()
        full = torch.tensor(full_layers if full_layers is not None else [True] * heads.shape[0])
        ranked = heads.masked_fill(~full[:, None], -torch.inf).flatten()  # (L·Hkv,)
        order = torch.sort(ranked, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        self.heads = heads
        self.rank = rank.view(heads.shape)  # (L, Hkv)
        self.n_heads = int(full.sum()) * heads.shape[1]

    def setup(self, model: torch.nn.Module, tokenizer: Any) -> None:
        from kvtrim.models import text_config

        types = getattr(text_config(model), "layer_types", None)
        full_layers = None if types is None else ["sliding" not in str(t) for t in types]
        if self.heads is None:
            from kvtrim.calibration import load_or_compute_duo_heads

            self.set_heads(load_or_compute_duo_heads(model, tokenizer), full_layers)
        elif full_layers is not None:
            self.set_heads(self.heads, full_layers)

    def plan(self, n_tokens: int, ratio: float) -> tuple[int, int, int]:
        """(retrieval heads across the model, pairs each retrieval head keeps, each streaming head keeps)."""
        if self.rank is None:
            raise RuntimeError("DuoBudget.setup() must run before selecting (compress() does it).")
        stream = min(n_tokens, self.sinks + self.window)
        total = n_keep(n_tokens, ratio) * self.n_heads  # the uniform budget's pairs
        if self.retrieval is None:
            fraction = 1.0 if stream >= n_tokens else (total / self.n_heads - stream) / (n_tokens - stream)
            n_ret = round(min(1.0, max(0.0, fraction)) * self.n_heads)
            return n_ret, n_tokens, stream
        n_ret = round(self.retrieval * self.n_heads)
        share = (total - stream * (self.n_heads - n_ret)) / max(n_ret, 1)
        return n_ret, int(min(n_tokens, max(1, round(share)))), stream

    def _check_fits(self, n_layers: int, heads: int | None = None) -> torch.Tensor:
        """The rank table, after checking it was calibrated for a model of this shape."""
        if self.rank is None:
            raise RuntimeError("DuoBudget.setup() must run before selecting (compress() does it).")
        if self.rank.shape[0] != n_layers or heads not in (None, self.rank.shape[1]):
            raise KVTrimError(
                f"The duo head split {tuple(self.rank.shape)} does not fit this model ({n_layers} layers"
                f"{'' if heads is None else f', {heads} kv-heads'}): recalibrate with "
                "`kvtrim calibrate --what duo-heads` or pass heads of the right shape."
            )
        return self.rank

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        n_ret, ret_keep, stream = self.plan(n_tokens, ratio)
        retrieval = self._check_fits(n_layers)[layer_idx] < n_ret  # (Hkv,)
        kept = int(retrieval.sum()) * ret_keep + int((~retrieval).sum()) * stream
        return round(kept / len(retrieval))

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        bsz, heads, seq = scores.shape
        rank = self._check_fits(n_layers, heads)
        n_ret, ret_keep, _ = self.plan(seq, ratio)
        retrieval = (rank[layer_idx] < n_ret).to(scores.device)  # (Hkv,)
        positions = torch.arange(seq, device=scores.device)  # a prefill: index = position
        streaming = (positions < self.sinks) | (positions >= seq - self.window)  # (T,)
        mask = streaming[None, None].expand(bsz, heads, seq).clone()  # (B, Hkv, T)
        if ret_keep >= seq:
            best = torch.ones_like(mask)
        else:
            best = torch.zeros_like(mask).scatter_(2, top_indices(scores, ret_keep), True)  # (B, Hkv, T)
        return torch.where(retrieval[None, :, None], best, mask)


BUDGETS: dict[str, type[Budget]] = {
    cls.name: cls
    for cls in (UniformBudget, TokenBudget, PyramidBudget, AdaptiveBudget, ThresholdBudget, DuoBudget)
}


def make_budget(budget: str | Budget = "uniform", **options: Any) -> Budget:
    """Build a budget policy from its name and options (or pass a ready one through); the name may
    carry options itself (:mod:`kvtrim.specs`): ``adaptive:alpha=0.1``."""
    if isinstance(budget, Budget):
        return budget
    budget, spec_options = parse_spec(budget)
    options = {**spec_options, **options}
    cls = BUDGETS.get(budget)
    if cls is None:
        raise KVTrimError(f"Unknown budget {budget!r}. Available: {', '.join(BUDGETS)}.")
    try:
        return cls(**options)
    except TypeError as err:
        raise KVTrimError(f"Bad option for budget {budget!r}: {err}") from err
