"""Answering (or scoring the continuation of) samples under their cells.

Where a cell's cache comes from is a source (:mod:`kvtrim.bench.sources`): one shared prefill per
sample (every cell derived from it, bit-identical to compressing alone; query-aware cells share a
second one, question included), a shared left-padded batch prefill for several samples, or — with
``share=False``, for checking — a compression of each cell alone. How answers are produced is the
other half: one cell at a time, cells of one shared prefill answered together (``cell_batch``), or
samples answered together (``batch_size``). Every row goes through :meth:`CellEvaluator._row`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvtrim.attention.interface import enable
from kvtrim.bench.config import BenchConfig
from kvtrim.bench.continuation import continuation_nll
from kvtrim.bench.plan import cell_chunks
from kvtrim.bench.rows import CellFigures, Outcome, build_row, versions
from kvtrim.bench.samples import uses_chat_template
from kvtrim.bench.sources import CellSources, Source
from kvtrim.bench.tasks.perplexity import continuation_ids
from kvtrim.bench.tasks.sample import Sample
from kvtrim.budgets import make_budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import Cell
from kvtrim.models.adapters import max_context
from kvtrim.scorers import make_scorer
from kvtrim.sessions import BatchSession, Session
from kvtrim.strategies.cell_batch import answer_cells
from kvtrim.strategies.planner import batchable


@dataclass
class CellEvaluator:
    """Answers (or scores the continuation of) samples under each of their pending cells."""

    model: Any
    tokenizer: Any
    config: BenchConfig
    share: bool = True
    versions: dict[str, str] = field(default_factory=versions)
    #: answer up to this many cells of a sample in one batch (:mod:`kvtrim.strategies.cell_batch`)
    cell_batch: int = 1

    def __post_init__(self) -> None:
        if self.cell_batch < 1:
            raise KVTrimError(f"cell_batch must be >= 1, got {self.cell_batch}")
        names = ["none", *self.config.methods]
        self.scorers = {name: make_scorer(name) for name in dict.fromkeys(names)}
        windows = self.config.windows
        if windows:  # the shared prefills leave windows whole: every cell is compressed alone
            self.share = False
        self.sources = CellSources(
            self.model, self.tokenizer, self.scorers, self.config.seed, self.share, windows
        )
        if any(b != "uniform" for b in self.config.budgets) or self.cell_batch > 1 or windows:
            # Every cell — shared or alone, whatever its budget — then runs on the same attention
            # function, so the order cells are run in cannot change a row.
            enable(self.model)

    # --- one sample ---------------------------------------------------------------------------------

    def run(self, task: str, index: int, sample: Sample, cells: Sequence[Cell]) -> Iterator[dict]:
        """Rows of the pending ``cells`` of one sample, each yielded as soon as it is done."""
        cells = [Cell(*cell) for cell in cells]
        chat = uses_chat_template(self.tokenizer, self.config, task)
        for question, group in self._groups(sample, cells):
            source = self.sources.for_sample(sample.context, group, chat, question)
            if source.shared and self.cell_batch > 1 and task != "perplexity":
                yield from self._answer_cell_batches(task, index, sample, source, group, chat)
            else:
                yield from self._answer_one_by_one(task, index, sample, source, group, chat)

    def _groups(self, sample: Sample, cells: Sequence[Cell]) -> list[tuple[str | None, list[Cell]]]:
        """Cells that share a prefill: the question-agnostic ones, then the query-aware ones (their
        prefill holds the question). Without sharing, every cell is its own group."""
        if not self.share:
            return [(sample.question if self._aware(c) else None, [c]) for c in cells]
        agnostic = [c for c in cells if not self._aware(c)]
        aware = [c for c in cells if self._aware(c)]
        return [(q, group) for q, group in ((None, agnostic), (sample.question, aware)) if group]

    def _aware(self, cell: Cell) -> bool:
        return self.scorers[cell.method].query_aware

    def _answer_one_by_one(
        self, task: str, index: int, sample: Sample, source: Source, cells: list[Cell], chat: bool
    ) -> Iterator[dict]:
        for cell in cells:
            start = time.perf_counter()
            session = source.session(cell)
            outcome = self._evaluate(task, sample, session, chat)
            figures = CellFigures.of_session(session, cell, self.config.windows)
            yield self._row(task, index, sample, figures, outcome, source, start)

    def _answer_cell_batches(
        self, task: str, index: int, sample: Sample, source: Source, cells: list[Cell], chat: bool
    ) -> Iterator[dict]:
        prefix, limit = self._answer_args(sample, chat)
        for chunk in cell_chunks(cells, self.cell_batch):
            start = time.perf_counter()
            sessions = [source.session(cell) for cell in chunk]
            answers = answer_cells(sessions, sample.question, limit, prefix)
            share = (time.perf_counter() - start) / len(chunk)
            for cell, session, answer in zip(chunk, sessions, answers, strict=True):
                figures = CellFigures.of_session(session, cell, self.config.windows)
                outcome = Outcome(eval_s=answer.answer_s, answer=answer)
                row = self._row(task, index, sample, figures, outcome, source, time.perf_counter() - share)
                row["cell_batch"] = len(chunk)
                yield row

    def _evaluate(self, task: str, sample: Sample, session: Session, chat: bool) -> Outcome:
        """The sample's answer under ``session`` — or, for perplexity, its continuation's NLL."""
        if task == "perplexity":
            ids = continuation_ids(self.tokenizer, sample)
            limit = max_context(self.model)
            if session.context_length + len(ids) > limit:
                raise KVTrimError(
                    f"perplexity: context ({session.context_length}) + continuation ({len(ids)}) tokens "
                    f"exceed the model's window of {limit}; lower --length."
                )
            start = time.perf_counter()
            nll = continuation_nll(session, ids)
            return Outcome(eval_s=time.perf_counter() - start, nll=nll)
        prefix, budget = self._answer_args(sample, chat)
        answer = session.answer(sample.question, max_new_tokens=budget, answer_prefix=prefix)
        return Outcome(eval_s=answer.answer_s, answer=answer)

    def _answer_args(self, sample: Sample, chat: bool) -> tuple[str, int]:
        """The answer prefix and the new-token budget a sample is answered with."""
        prefix = sample.answer_prefix if self.config.answer_prefix else ""
        if chat:
            prefix = prefix.lstrip()  # the assistant turn starts fresh after its tag
        budget = sample.max_new_tokens
        if self.config.max_new_tokens is not None:
            budget = min(budget, self.config.max_new_tokens)
        return prefix, budget

    def _row(
        self,
        task: str,
        index: int,
        sample: Sample,
        figures: CellFigures,
        outcome: Outcome,
        source: Source,
        start: float,
    ) -> dict[str, Any]:
        """Every row is made here, once it is answered (the prefill's wall time goes to the first)."""
        timing = {
            "cell_s": time.perf_counter() - start + source.take_setup_s(),
            "shared_prefill": source.shared,
            "prefill_cells": source.cells,
        }
        return build_row(self.config, task, index, sample, figures, outcome, timing, self.versions)

    # --- several samples of one task ----------------------------------------------------------------

    def run_batch(
        self, task: str, items: Sequence[tuple[int, Sample]], cells: Sequence[Cell]
    ) -> Iterator[dict]:
        """Rows of several samples of one task at once: the cells a left-padded batch can hold in
        one batch (one shared prefill for all of them), the others sample by sample."""
        cells = [Cell(*cell) for cell in cells]
        batched = [c for c in cells if self._batchable(task, c)] if len(items) > 1 else []
        rest = [c for c in cells if c not in batched]
        if batched:
            yield from self._answer_batch(task, items, batched)
        if rest:
            for index, sample in items:
                yield from self.run(task, index, sample, rest)

    def _batchable(self, task: str, cell: Cell) -> bool:
        has_question = task != "perplexity"
        return batchable(self.model, make_budget(cell.budget), self.scorers[cell.method], has_question)

    def _answer_batch(
        self, task: str, items: Sequence[tuple[int, Sample]], cells: list[Cell]
    ) -> Iterator[dict]:
        chat = uses_chat_template(self.tokenizer, self.config, task)
        samples = [sample for _, sample in items]
        args = [self._answer_args(sample, chat) for sample in samples]
        source = self.sources.for_samples([s.context for s in samples], cells, chat)
        for cell in cells:
            start = time.perf_counter()
            batch: BatchSession = source.session(cell)
            answers = batch.answer(
                [s.question for s in samples],
                max_new_tokens=[budget for _, budget in args],
                answer_prefix=[prefix for prefix, _ in args],
            )
            for b, (index, sample) in enumerate(items):
                answer = replace(answers[b], answer_s=answers[b].answer_s / len(batch))
                figures = CellFigures.of_batch_element(batch, b, cell)
                row = self._row(task, index, sample, figures, Outcome(answer.answer_s, answer), source, start)
                row["batch_size"] = len(items)
                yield row
