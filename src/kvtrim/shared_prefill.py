"""Prefill a context once and derive a compressed session for every (method, ratio, budget) from it.

Why it is exact: compression in kvtrim happens after each layer's attention, so the prefill's
hidden states — and therefore every scorer's view of every layer — are the same whatever is
evicted. Scoring all methods in one prefill, keeping the full cache, and building each cell's
layers from it with the budget's own choice (:func:`kvtrim.engine.keep_selected`, the engine's own
code) gives bit-identical caches to compressing with each (method, ratio, budget) alone, for the
price of one prefill (plus each scorer's own time).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim import ragged
from kvtrim.budgets import Budget, UniformBudget, check_ratio, make_budget
from kvtrim.cache import layer_bytes, layer_heads, layer_tokens, logical_bytes
from kvtrim.engine import CompressionStats, Compressor, keep_selected
from kvtrim.errors import KVTrimError
from kvtrim.methods import LayerView, Scorer, make_scorer
from kvtrim.models import text_config
from kvtrim.prompting import PromptLayout
from kvtrim.reconstruction import score_by_reconstruction
from kvtrim.session import Session, encode_context

Cell = tuple[str, float, str]  # (method, ratio, budget name)


class _ScoreRecorder(Compressor):
    """Scores every layer with every scorer and records each cell's choice; evicts nothing."""

    def __init__(
        self,
        model: nn.Module,
        scorers: Mapping[str, Scorer],
        ratios: list[float],
        budgets: Mapping[str, Budget],
        seed: int,
    ):
        super().__init__(model, make_scorer("none"), 0.0, seed=seed)
        self.scorers = dict(scorers)
        self.ratios = ratios
        self.budgets = dict(budgets)
        # cell -> per non-sliding layer: what budget.select returned ((B, Hkv, K) indices or a
        # (B, Hkv, T) keep mask), or None when the layer keeps everything
        self.kept: dict[Cell, list[torch.Tensor | None]] = {
            (name, r, b): [] for name in self.scorers for r in ratios for b in self.budgets
        }
        self.score_s: dict[str, float] = dict.fromkeys(self.scorers, 0.0)
        self.select_s: dict[Cell, float] = dict.fromkeys(self.kept, 0.0)

    def _compress(
        self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any, cache: Any
    ) -> None:
        seq = layer_tokens(layer)

        def make_view() -> LayerView:
            positions = self._key_positions(idx, layer.keys, kwargs)
            return self._view(attn, idx, layer.keys, layer.values, kwargs, projected, positions)

        for cell, chosen in self._choices(idx, seq, make_view).items():
            self.kept[cell].append(chosen)
        self.stats.layers_compressed += 1
        self._account(layer, layer_bytes(layer), seq, seq)

    def _compress_padded(self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any) -> None:
        """A left-padded batch: each element's choices, made on its own pairs only.

        Records, per cell and layer, a list with one (1, Hkv, K_b) choice (or None) per element.
        """
        assert self.padding is not None
        seq = layer_tokens(layer)
        per_element = [
            self._choices(
                idx,
                seq - pad,
                lambda b=b, pad=pad: self._element_view(attn, idx, layer, kwargs, projected, b, pad),
            )
            for b, pad in enumerate(self.padding)
        ]
        for cell in self.kept:
            self.kept[cell].append([choices[cell] for choices in per_element])
        self.stats.layers_compressed += 1

    def _choices(self, idx: int, seq: int, make_view: Callable[[], LayerView]) -> dict[Cell, Any]:
        """Every cell's choice for one layer of ``seq`` pairs: what budget.select returns, or None
        when the cell keeps everything. Each scorer runs once, on a view built at most once."""
        n_layers = len(self._attentions)
        view = None
        choices: dict[Cell, Any] = {}
        for name, scorer in self.scorers.items():
            evicting = {
                (r, b): scorer.evicts and budget.evicts(seq, r)
                for r in self.ratios
                for b, budget in self.budgets.items()
            }
            scores = None
            if any(evicting.values()):
                start = time.perf_counter()
                if view is None:
                    view = make_view()
                if not scorer.uses_budget:
                    scores = scorer.score(view)  # (B, Hkv, T)
                self.score_s[name] += time.perf_counter() - start
            for (ratio, budget_name), evicts in evicting.items():
                chosen = None
                if evicts:
                    budget = self.budgets[budget_name]
                    start = time.perf_counter()
                    if scorer.uses_budget:  # its scores depend on the cell's kept count: rescore
                        keep = budget.layer_keep(seq, idx, n_layers, ratio)
                        scores = scorer.score(dataclasses.replace(view, budget_keep=keep))  # (B, Hkv, T)
                        self.score_s[name] += time.perf_counter() - start
                        start = time.perf_counter()
                    chosen = budget.select(scores, idx, n_layers, ratio)
                    self.select_s[(name, ratio, budget_name)] += time.perf_counter() - start
                choices[(name, ratio, budget_name)] = chosen
        return choices


def _is_sliding(layer: Any) -> bool:
    return bool(getattr(layer, "is_sliding", False))


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
        key = (method, check_ratio(ratio), budget)
        if key not in self.kept:
            raise KVTrimError(f"No cell {key} in this prefill; cells: {self.cells()}")
        cache = copy.copy(self.full_cache)
        cache.layers = []
        stats = CompressionStats(compress_s=self.score_s.get(method, 0.0) + self.select_s.get(key, 0.0))
        chosen_iter = iter(self.kept[key])
        for layer in self.full_cache.layers:
            pruned = copy.copy(layer)  # shares the full tensors until keep_selected replaces them
            before = logical_bytes(layer.keys) + logical_bytes(layer.values)
            seq = layer_tokens(layer)
            keep: float = seq
            if not _is_sliding(layer):
                chosen = next(chosen_iter)
                if chosen is not None:
                    kept = keep_selected(pruned, chosen)
                    pruned, keep = kept.layer, kept.per_head
                stats.layers_compressed += 1
            stats.add_layer(before, layer_bytes(pruned), seq, keep, layer_heads(pruned))
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
            budget=budget,
            question=self.question,
        )


def _budget_map(budgets: Iterable[str | Budget] | Mapping[str, Budget]) -> dict[str, Budget]:
    """Budgets keyed by name; a non-uniform one needs kvtrim's attention (ragged or per-layer)."""
    if isinstance(budgets, Mapping):
        out = {name: make_budget(b) for name, b in budgets.items()}
    else:
        out = {}
        for budget in budgets:
            policy = make_budget(budget)
            out[budget if isinstance(budget, str) else policy.name] = policy
    if not out:
        raise KVTrimError("No budget to compress with; give at least one (e.g. 'uniform').")
    return out


def _scorer_map(
    methods: Iterable[str | Scorer] | Mapping[str, Scorer], question: str | None = None
) -> dict[str, Scorer]:
    """Scorers keyed by name; query-aware ones need the question, reconstruction ones refuse it."""
    if isinstance(methods, Mapping):
        scorers = dict(methods)
    else:
        scorers = {}
        for method in methods:
            scorer = make_scorer(method)
            scorers[method if isinstance(method, str) else scorer.name] = scorer
    for name, scorer in scorers.items():
        if scorer.needs_reconstruction and question is not None:
            raise KVTrimError(f"Method {name!r} reconstructs the context alone; it takes no question.")
        if scorer.query_aware and question is None:
            raise KVTrimError(
                f"Method {name!r} needs the question while compressing; it cannot share a "
                "question-agnostic prefill (pass question=...)."
            )
    return scorers


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
    from transformers import DynamicCache

    layout, ids = encode_context(model, tokenizer, context, use_chat_template, question)
    scorers = _scorer_map(methods, question)
    ratio_list = [check_ratio(r) for r in ratios]
    policies = _budget_map(budgets)
    if any(not isinstance(p, UniformBudget) for p in policies.values()):
        # As Compressor does for such budgets: the cells' caches (and, for the prefill to match
        # compressing alone, the prefill itself) run on kvtrim's attention function.
        ragged.enable(model)
    for scorer in scorers.values():
        scorer.setup(model, tokenizer)
    for policy in policies.values():
        policy.setup(model, tokenizer)
    # Reconstruction scorers (KVzip) score after the prefill, from the full cache it leaves.
    in_prefill = {name: s for name, s in scorers.items() if not s.needs_reconstruction}
    recorder = _ScoreRecorder(model, in_prefill, ratio_list, policies, seed)
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
    kept, score_s = recorder.kept, recorder.score_s
    for name, scorer in scorers.items():
        if scorer.needs_reconstruction:
            start = time.perf_counter()
            cells = _reconstruction_cells(
                model, tokenizer, cache, scorer, layout, context, len(ids), ratio_list, policies, seed
            )
            kept.update({(name, *cell): chosen for cell, chosen in cells.items()})
            score_s[name] = time.perf_counter() - start
    return SharedPrefill(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        context_length=len(ids),
        full_cache=cache,
        prefill_s=total - recorder.stats.compress_s,
        kept=kept,
        score_s=score_s,
        select_s=recorder.select_s,
        question=question,
    )


def _reconstruction_cells(
    model: nn.Module,
    tokenizer: Any,
    cache: Any,
    scorer: Scorer,
    layout: PromptLayout,
    context: str,
    context_length: int,
    ratios: list[float],
    policies: Mapping[str, Budget],
    seed: int,
) -> dict[tuple[float, str], list[torch.Tensor | None]]:
    """Each (ratio, budget)'s choice for a reconstruction scorer, from one reconstruction of the
    full cache: its scores depend on neither, and ``compress`` applies the budget per layer."""
    scores, _ = score_by_reconstruction(
        model, tokenizer, cache, scorer, layout, context, context_length, seed
    )
    full_layers = [idx for idx, layer in enumerate(cache.layers) if not _is_sliding(layer)]
    n_layers = len(cache.layers)
    cells: dict[tuple[float, str], list[torch.Tensor | None]] = {}
    for ratio in ratios:
        for budget_name, budget in policies.items():
            chosen: list[torch.Tensor | None] = []
            for idx in full_layers:
                seq = layer_tokens(cache.layers[idx])
                evicts = scorer.evicts and budget.evicts(seq, ratio)
                chosen.append(budget.select(scores[idx], idx, n_layers, ratio) if evicts else None)
            cells[(ratio, budget_name)] = chosen
    return cells
