"""Where a cell's cache comes from: one shared prefill for many cells, or (``share=False``, for
checking) a compression of each cell alone — for one sample, or for a left-padded batch of samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtrim.api import compress
from kvtrim.core.spec import Cell
from kvtrim.scorers import Scorer
from kvtrim.strategies.shared_batch import prefill_batch_once
from kvtrim.strategies.shared_prefill import prefill_once


@dataclass
class Source:
    """Where a group of cells gets its caches: ``session(cell)``; ``shared`` when one prefill serves
    ``cells`` of them (its wall time ``setup_s`` is charged to the first row)."""

    session: Callable[[Cell], Any]
    shared: bool
    cells: int = 1
    setup_s: float = 0.0

    def take_setup_s(self) -> float:
        setup, self.setup_s = self.setup_s, 0.0
        return setup


@dataclass
class CellSources:
    """Builds the :class:`Source` of a group of cells (all of one prefill when ``share``)."""

    model: Any
    tokenizer: Any
    scorers: dict[str, Scorer]
    seed: int
    share: bool = True
    windows: bool = False  # cells compress sliding-window layers too (only alone)

    def for_sample(self, context: str, cells: list[Cell], chat: bool, question: str | None) -> Source:
        """The cells of one sample (``question`` prefilled after the context for query-aware ones)."""
        if not self.share:
            return Source(lambda cell: self._alone(context, cell, chat, question), shared=False)
        start = time.perf_counter()
        scorers, ratios, options = self._axes(cells, chat)
        prefill = prefill_once(
            self.model, self.tokenizer, context, scorers, ratios, question=question, **options
        )
        return Source(lambda cell: prefill.session(*cell), True, len(cells), time.perf_counter() - start)

    def for_samples(self, contexts: list[str], cells: list[Cell], chat: bool) -> Source:
        """The cells of several samples in one left-padded batch."""
        if not self.share:
            return Source(lambda cell: self._alone(contexts, cell, chat), shared=False)
        start = time.perf_counter()
        scorers, ratios, options = self._axes(cells, chat)
        prefill = prefill_batch_once(self.model, self.tokenizer, contexts, scorers, ratios, **options)
        return Source(lambda cell: prefill.session(*cell), True, len(cells), time.perf_counter() - start)

    def _axes(self, cells: list[Cell], chat: bool) -> tuple[dict[str, Scorer], list[float], dict[str, Any]]:
        """The scorers, ratios and other options one prefill serves ``cells`` with."""
        scorers = {m: self.scorers[m] for m in dict.fromkeys(c.method for c in cells)}
        ratios = list(dict.fromkeys(c.ratio for c in cells))
        budgets = list(dict.fromkeys(c.budget for c in cells))
        return scorers, ratios, {"budgets": budgets, "use_chat_template": chat, "seed": self.seed}

    def _alone(self, context: str | list[str], cell: Cell, chat: bool, question: str | None = None) -> Any:
        """The cell compressed on its own (the reference the shared paths are checked against)."""
        return compress(
            self.model,
            self.tokenizer,
            context,
            method=self.scorers[cell.method],
            ratio=cell.ratio,
            budget=cell.budget,
            use_chat_template=chat,
            seed=self.seed,
            question=question,
            windows=self.windows,
        )
