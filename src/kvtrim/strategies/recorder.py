"""Scoring one prefill for many cells at once: every scorer once per layer, every budget's choice
for every ratio recorded, nothing evicted (the shared-prefill strategies build each cell from it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvtrim.budgets.base import Budget
from kvtrim.cache.layers import layer_bytes, layer_tokens
from kvtrim.core.clock import device_time
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import check_ratio
from kvtrim.core.spec import Cell
from kvtrim.engine.call import LayerCall
from kvtrim.engine.eviction import Selector
from kvtrim.schedules.base import Schedule
from kvtrim.scorers.base import LayerView, Scorer


def recorded_cell(kept: Mapping[Cell, Any], method: str, ratio: float, budget: str) -> Cell:
    """The cell of a shared prefill's recorded choices, or one clear error naming the cells there are."""
    key = Cell(method, check_ratio(ratio), budget)
    if key not in kept:
        raise KVTrimError(f"No cell {tuple(key)} in this prefill; cells: {[tuple(c) for c in kept]}")
    return key


class ScoreRecorder(Schedule):
    """Scores every layer with every scorer and records each cell's choice; evicts nothing.

    ``kept[cell]`` holds, per non-sliding layer, what the budget selected ((B, Hkv, K) indices or
    a (B, Hkv, T) keep mask) or None when the cell keeps everything; for a left-padded batch
    (``padding``), a list with one (1, Hkv, K_b) choice (or None) per element.
    """

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        ratios: list[float],
        budgets: Mapping[str, Budget],
        padding: list[int] | None = None,
    ):
        self.scorers = dict(scorers)
        self.ratios = ratios
        self.budgets = dict(budgets)
        self.padding = padding
        self.kept: dict[Cell, list[Any]] = {
            Cell(name, r, b): [] for name in self.scorers for r in ratios for b in self.budgets
        }
        self.score_s: dict[str, float] = dict.fromkeys(self.scorers, 0.0)
        self.select_s: dict[Cell, float] = dict.fromkeys(self.kept, 0.0)
        #: cells whose budget weighs all layers together: layer -> scores, chosen in :meth:`settle`
        self.deferred: dict[Cell, dict[int, torch.Tensor]] = {}
        self.n_layers = 0

    def takes(self, call: LayerCall) -> bool:
        return call.is_first_forward

    def compress_layer(self, call: LayerCall) -> None:
        layer = call.layer
        seq = layer_tokens(layer)
        call.stats.layers_compressed += 1
        if self.padding is None:

            def make_view() -> LayerView:
                return call.view(layer.keys, layer.values, call.key_positions(layer.keys))

            for cell, chosen in self._choices(call, seq, make_view).items():
                self.kept[cell].append(chosen)
            call.account(layer, layer_bytes(layer), seq, seq)
            return
        per_element = [
            self._choices(call, seq - pad, lambda b=b, pad=pad: call.element_view(b, pad, lambda n: None))
            for b, pad in enumerate(self.padding)
        ]
        for cell in self.kept:
            self.kept[cell].append([choices[cell] for choices in per_element])

    def _choices(self, call: LayerCall, seq: int, make_view: Callable[[], LayerView]) -> dict[Cell, Any]:
        """Every cell's choice for one layer of ``seq`` pairs: what the budget selects, or None
        when the cell keeps everything. Each scorer runs once, on a view built at most once."""
        view = None
        choices: dict[Cell, Any] = {}
        for name, scorer in self.scorers.items():
            selectors = {
                (r, b): Selector(scorer, budget, r) for r in self.ratios for b, budget in self.budgets.items()
            }
            evicting = {key: selector.evicts(seq) for key, selector in selectors.items()}
            scores = None
            if any(evicting.values()):
                start = device_time(call.device)
                if view is None:
                    view = make_view()
                if not scorer.uses_budget:
                    scores = scorer.score(view)  # (B, Hkv, T)
                self.score_s[name] += device_time(call.device) - start
            for (ratio, budget_name), selector in selectors.items():
                cell = Cell(name, ratio, budget_name)
                choices[cell] = None
                if evicting[(ratio, budget_name)]:
                    choices[cell] = self._select(call, cell, selector, view, scores, seq)
        return choices

    def settle(self) -> None:
        """Choose the cells deferred to the end of the prefill (budgets spanning layers)."""
        for cell, scores in self.deferred.items():
            device = next(iter(scores.values())).device
            start = device_time(device)
            budget = self.budgets[cell.budget]
            chosen = Selector(self.scorers[cell.method], budget, cell.ratio).select_all(scores, self.n_layers)
            self.kept[cell] = [chosen[c.idx] if isinstance(c, _Deferred) else c for c in self.kept[cell]]
            self.select_s[cell] += device_time(device) - start
        self.deferred = {}

    def _select(
        self, call: LayerCall, cell: Cell, selector: Selector, view: LayerView, scores: Any, seq: int
    ) -> Any:
        """The cell's choice for this layer: (B, Hkv, K) indices or a (B, Hkv, T) mask, or a
        :class:`_Deferred` stand-in for a budget spanning layers."""
        start = device_time(call.device)
        self.n_layers = call.n_layers
        if selector.budget.spans_layers:  # chosen with every layer's scores, once all are in
            if self.padding is not None:
                raise KVTrimError(f"The {cell.budget!r} budget compresses one context at a time.")
            if scores is None:
                scores = selector.scorer.score(view)  # (B, Hkv, T)
            self.deferred.setdefault(cell, {})[call.idx] = scores
            return _Deferred(call.idx)
        if selector.scorer.uses_budget:  # its scores depend on the cell's kept count: rescore
            keep = selector.layer_keep(seq, call.idx, call.n_layers)
            scores = selector.scorer.score(dataclasses.replace(view, budget_keep=keep))  # (B, Hkv, T)
            self.score_s[cell.method] += device_time(call.device) - start
            start = device_time(call.device)
        chosen = selector.select(scores, call.idx, call.n_layers, view)
        self.select_s[cell] += device_time(call.device) - start
        return chosen


@dataclasses.dataclass(frozen=True)
class _Deferred:
    """Stands in a cell's list for layer ``idx``'s choice until :meth:`ScoreRecorder.settle`."""

    idx: int
