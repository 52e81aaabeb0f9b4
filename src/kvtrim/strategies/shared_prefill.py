"""Prefill a context once and derive a compressed session for every (method, ratio, budget) from it.

Why it is exact: compression in kvtrim happens after each layer's attention, so the prefill's
hidden states — and therefore every scorer's view of every layer — are the same whatever is
evicted. Scoring all methods in one prefill (:class:`~kvtrim.strategies.recorder.ScoreRecorder`),
keeping the full cache, and building each cell's layers from it with the budget's own choice
(:func:`kvtrim.cache.keep.keep_selected`, the engine's own code) gives bit-identical caches to
compressing with each (method, ratio, budget) alone, for the price of one prefill (plus each
scorer's own time).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.attention.interface import enable
from kvtrim.budgets.base import Budget
from kvtrim.cache.keep import keep_selected
from kvtrim.cache.layers import (
    is_sliding,
    layer_bytes,
    layer_heads,
    layer_tokens,
    logical_bytes,
    sliding_bytes,
)
from kvtrim.core.clock import device_time
from kvtrim.core.ratios import check_ratio
from kvtrim.core.spec import Cell
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.compressor import Compressor
from kvtrim.generation import prefill
from kvtrim.models.adapters import model_device
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import PromptLayout, encode_context, question_tokens
from kvtrim.scorers.base import Scorer
from kvtrim.sessions.session import Session
from kvtrim.strategies.planner import budget_map, check_shared_scorers, needs_kvtrim_attention, scorer_map
from kvtrim.strategies.reconstruction import reconstruction_choices
from kvtrim.strategies.recorder import ScoreRecorder, recorded_cell


@dataclass
class SharedPrefill:
    """One uncompressed prefill plus every (method, ratio, budget) cell's choice of pairs."""

    model: nn.Module
    tokenizer: Any
    layout: PromptLayout
    context_length: int
    full_cache: Any
    prefill_s: float
    kept: dict[Cell, list[torch.Tensor | None]]
    score_s: dict[str, float] = field(default_factory=dict)
    select_s: dict[Cell, float] = field(default_factory=dict)
    #: the question prefilled after the context (query-aware methods), or None
    question: str | None = None

    def cells(self) -> list[Cell]:
        return list(self.kept)

    def session(self, method: str, ratio: float, budget: str = "uniform") -> Session:
        """A session whose cache holds exactly what ``compress(context, method, ratio, budget=budget)``
        would keep."""
        key = recorded_cell(self.kept, method, ratio, budget)
        cache = copy.copy(self.full_cache)
        cache.layers = []
        stats = CompressionStats(compress_s=self.score_s.get(method, 0.0) + self.select_s.get(key, 0.0))
        chosen_iter = iter(self.kept[key])
        for layer in self.full_cache.layers:
            pruned = copy.copy(layer)  # shares the full tensors until keep_selected replaces them
            before = logical_bytes(layer.keys) + logical_bytes(layer.values)
            seq = layer_tokens(layer)
            keep: float = seq
            if not is_sliding(layer):
                chosen = next(chosen_iter)
                if chosen is not None:
                    kept = keep_selected(pruned, chosen)
                    pruned, keep = kept.layer, kept.per_head
                stats.layers_compressed += 1
            stats.add_layer(before, layer_bytes(pruned), seq, keep, layer_heads(pruned))
            cache.layers.append(pruned)
        stats.kv_bytes_sliding = sliding_bytes(cache)
        return Session(
            model=self.model,
            tokenizer=self.tokenizer,
            cache=cache,
            layout=self.layout,
            context_length=self.context_length,
            method=method,
            ratio=key.ratio,
            stats=stats,
            prefill_s=self.prefill_s,
            budget=budget,
            question=self.question,
        )


def _prepare(
    model: nn.Module,
    tokenizer: Any,
    methods: Iterable[str | Scorer] | Mapping[str, Scorer],
    ratios: Iterable[float],
    budgets: Iterable[str | Budget] | Mapping[str, Budget],
    question: str | None,
) -> tuple[dict[str, Scorer], list[float], dict[str, Budget]]:
    """The scorers, ratios and budgets of the cells, checked, set up, the model's attention chosen."""
    scorers = scorer_map(methods)
    check_shared_scorers(scorers, question)
    ratio_list = [check_ratio(r) for r in ratios]
    policies = budget_map(budgets)
    if any(needs_kvtrim_attention(p, 0.0) for p in policies.values()):
        # as compressing alone does for such budgets: the cells' caches (and, for the prefill to
        # match compressing alone, the prefill itself) run on kvtrim's attention function
        enable(model)
    for scorer in scorers.values():
        scorer.setup(model, tokenizer)
    for policy in policies.values():
        policy.setup(model, tokenizer)
    return scorers, ratio_list, policies


@torch.inference_mode()
def prefill_once(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    methods: Iterable[str | Scorer] | Mapping[str, Scorer],
    ratios: Iterable[float],
    *,
    budgets: Iterable[str | Budget] | Mapping[str, Budget] = ("uniform",),
    use_chat_template: bool | None = None,
    seed: int = 0,
    question: str | None = None,
) -> SharedPrefill:
    """Prefill ``context`` once, scoring it with every method; see :class:`SharedPrefill`.

    ``methods`` are names (or scorers, keyed by their name) of question-agnostic methods;
    ``budgets`` names (or policies, keyed by their name) of budgets, each applied to every
    (method, ratio). Methods scoring by reconstruction (KVzip) run their reconstruction once, on
    the full cache, for every ratio and budget. ``question`` is prefilled after the context, as
    ``compress(..., question=...)`` does: query-aware methods (``snapkv-query-aware``) then share
    one prefill per question, and every session answers that question only.
    """
    layout, ids = encode_context(model, tokenizer, context, use_chat_template, question)
    scorers, ratio_list, policies = _prepare(model, tokenizer, methods, ratios, budgets, question)
    # reconstruction scorers (KVzip) score after the prefill, from the full cache it leaves
    recorder = ScoreRecorder(
        {n: s for n, s in scorers.items() if not s.needs_reconstruction}, ratio_list, policies
    )
    n_question = question_tokens(tokenizer, layout, question)
    compressor = Compressor(model, recorder, seed=seed, question_tokens=n_question)
    cache = new_cache(model)
    with compressor.attached():
        _, total = prefill(model, cache, [ids])
    recorder.settle()
    kept, score_s = recorder.kept, recorder.score_s
    device = model_device(model)
    for name, scorer in scorers.items():
        if scorer.needs_reconstruction:  # KVzip: one reconstruction of the full cache for all its cells
            start = device_time(device)
            cells = reconstruction_choices(
                model, tokenizer, cache, scorer, layout, context, len(ids), ratio_list, policies, seed
            )
            kept.update({Cell(name, *cell): chosen for cell, chosen in cells.items()})
            score_s[name] = device_time(device) - start
    return SharedPrefill(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        context_length=len(ids),
        full_cache=cache,
        prefill_s=total - compressor.stats.compress_s,
        kept=kept,
        score_s=score_s,
        select_s=recorder.select_s,
        question=question,
    )
