"""DuoAttention (arXiv 2410.10819): retrieval heads keep everything, streaming heads sinks + recent."""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.budgets.base import Budget
from kvtrim.calibration import load_or_compute_duo_heads
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep
from kvtrim.core.selection import top_indices
from kvtrim.models.adapters import full_attention_layers


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
    heads_alike = False
    layers_alike = False

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
        full_layers = full_attention_layers(model)
        if self.heads is None:
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
