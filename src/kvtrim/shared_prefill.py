"""Prefill a context once and derive a compressed session for every (method, ratio) from it.

Why it is exact: compression in kvtrim happens after each layer's attention, so the prefill's
hidden states — and therefore every scorer's view of every layer — are the same whatever is
evicted. Scoring all methods in one prefill, keeping the full cache, and gathering each cell's kept
pairs from it gives bit-identical caches to compressing with each (method, ratio) alone, for the
price of one prefill (plus each scorer's own time).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.budgets import check_ratio, n_keep, top_indices
from kvtrim.cache import gather_positions, layer_bytes, layer_heads, layer_tokens, logical_bytes
from kvtrim.engine import CompressionStats, Compressor
from kvtrim.errors import KVTrimError
from kvtrim.methods import Scorer, make_scorer
from kvtrim.models import text_config
from kvtrim.prompting import PromptLayout
from kvtrim.session import Session, encode_context


class _ScoreRecorder(Compressor):
    """Scores every layer with every scorer and records the kept indices per ratio; evicts nothing."""

    def __init__(self, model: nn.Module, scorers: Mapping[str, Scorer], ratios: list[float], seed: int):
        super().__init__(model, make_scorer("none"), 0.0, seed=seed)
        self.scorers = dict(scorers)
        self.ratios = ratios
        # (method, ratio) -> per layer: (B, Hkv, keep) indices, or None when the layer keeps all
        self.kept: dict[tuple[str, float], list[torch.Tensor | None]] = {
            (name, r): [] for name in self.scorers for r in ratios
        }
        self.score_s: dict[str, float] = dict.fromkeys(self.scorers, 0.0)

    def _compress(
        self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any, cache: Any
    ) -> None:
        seq = layer_tokens(layer)
        view = None
        for name, scorer in self.scorers.items():
            keeps = {r: (n_keep(seq, r) if scorer.evicts else seq) for r in self.ratios}
            scores = None
            if any(k < seq for k in keeps.values()):
                start = time.perf_counter()
                if view is None:
                    positions = self._key_positions(idx, layer.keys, kwargs)
                    view = self._view(attn, idx, layer.keys, layer.values, kwargs, projected, positions)
                if not scorer.uses_budget:
                    scores = scorer.score(view)  # (B, Hkv, T)
                self.score_s[name] += time.perf_counter() - start
            for ratio, keep in keeps.items():
                if keep < seq and scorer.uses_budget:  # scores depend on the ratio's count
                    start = time.perf_counter()
                    scores = scorer.score(dataclasses.replace(view, budget_keep=keep))  # (B, Hkv, T)
                    self.score_s[name] += time.perf_counter() - start
                chosen = top_indices(scores, keep) if keep < seq else None  # (B, Hkv, keep)
                self.kept[(name, ratio)].append(chosen)
        self.stats.layers_compressed += 1
        self._account(layer, layer_bytes(layer), seq, seq)


def _is_sliding(layer: Any) -> bool:
    return bool(getattr(layer, "is_sliding", False))


@dataclass
class SharedPrefill:
    """One uncompressed prefill plus the kept indices of every (method, ratio) cell."""

    model: nn.Module
    tokenizer: Any
    layout: PromptLayout
    context_length: int
    full_cache: Any
    prefill_s: float
    kept: dict[tuple[str, float], list[torch.Tensor | None]]
    score_s: dict[str, float] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, float]]:
        return list(self.kept)

    def session(self, method: str, ratio: float) -> Session:
        """A session whose cache holds exactly what ``compress(context, method, ratio)`` would keep."""
        key = (method, check_ratio(ratio))
        if key not in self.kept:
            raise KVTrimError(f"No cell {key} in this prefill; cells: {self.cells()}")
        cache = copy.copy(self.full_cache)
        cache.layers = []
        stats = CompressionStats(compress_s=self.score_s.get(method, 0.0))
        chosen_iter = iter(self.kept[key])
        for layer in self.full_cache.layers:
            pruned = copy.copy(layer)
            before = logical_bytes(layer.keys) + logical_bytes(layer.values)
            seq = layer_tokens(layer)
            keep = seq
            if not _is_sliding(layer):
                chosen = next(chosen_iter)
                if chosen is not None:
                    pruned.keys = gather_positions(layer.keys, chosen)
                    pruned.values = gather_positions(layer.values, chosen)
                    keep = chosen.shape[-1]
                stats.layers_compressed += 1
            stats.add_layer(before, layer_bytes(pruned), seq, keep, layer_heads(layer))
            cache.layers.append(pruned)
        return Session(
            model=self.model,
            tokenizer=self.tokenizer,
            cache=cache,
            layout=self.layout,
            context_length=self.context_length,
            method=method,
            ratio=key[1],
            stats=stats,
            prefill_s=self.prefill_s,
        )


@torch.inference_mode()
def prefill_once(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    methods: Iterable[str | Scorer] | Mapping[str, Scorer],
    ratios: Iterable[float],
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
) -> SharedPrefill:
    """Prefill ``context`` once, scoring it with every method; see :class:`SharedPrefill`.

    ``methods`` are names (or scorers, keyed by their name) of question-agnostic methods.
    """
    from transformers import DynamicCache

    layout, ids = encode_context(model, tokenizer, context, use_chat_template)
    if isinstance(methods, Mapping):
        scorers = dict(methods)
    else:
        scorers = {}
        for method in methods:
            scorer = make_scorer(method)
            scorers[method if isinstance(method, str) else scorer.name] = scorer
    ratio_list = [check_ratio(r) for r in ratios]
    for scorer in scorers.values():
        scorer.setup(model, tokenizer)
    recorder = _ScoreRecorder(model, scorers, ratio_list, seed)
    device = next(model.parameters()).device
    cache = DynamicCache(config=text_config(model))
    start = time.perf_counter()
    with recorder.attached():
        model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.arange(len(ids), device=device)[None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    total = time.perf_counter() - start
    return SharedPrefill(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        context_length=len(ids),
        full_cache=cache,
        prefill_s=total - recorder.stats.compress_s,
        kept=recorder.kept,
        score_s=recorder.score_s,
    )
