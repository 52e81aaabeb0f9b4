"""One row of ``results.jsonl``: a cell's labels, its answer (or continuation NLL), its score, and
its memory and time figures, with what it needs to be reproduced (seed, versions, spec)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.tasks.sample import Sample
from kvtrim.core.spec import Cell, CompressionSpec
from kvtrim.core.stats import CompressionStats
from kvtrim.core.version import __version__
from kvtrim.sessions import Answer, BatchSession, Session


@dataclass
class CellFigures:
    """What a row reports about the cache a cell was answered from."""

    cell: Cell
    spec: CompressionSpec
    context_length: int
    stats: CompressionStats
    prefill_s: float

    @classmethod
    def of_session(cls, session: Session, cell: Cell, windows: bool = False) -> CellFigures:
        spec = CompressionSpec.from_cell(cell, query_aware=session.question is not None, windows=windows)
        return cls(cell, spec, session.context_length, session.stats, session.prefill_s)

    @classmethod
    def of_batch_element(cls, batch: BatchSession, b: int, cell: Cell) -> CellFigures:
        """Context b of a batch as if alone: its own figures, its share of the batch's prefill."""
        spec = CompressionSpec.from_cell(cell)
        return cls(cell, spec, batch.context_lengths[b], batch.element_stats(b), batch.prefill_s / len(batch))


@dataclass
class Outcome:
    """An answer, or the continuation's NLL (nats, tokens) for perplexity samples."""

    eval_s: float
    answer: Answer | None = None
    nll: tuple[float, int] | None = None


def versions() -> dict[str, str]:
    return {"kvtrim": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def build_row(
    config: BenchConfig,
    task: str,
    index: int,
    sample: Sample,
    figures: CellFigures,
    outcome: Outcome,
    timing: Mapping[str, Any],
    versions: Mapping[str, str],
) -> dict[str, Any]:
    """The row; ``timing`` holds ``cell_s``, ``shared_prefill`` and ``prefill_cells``."""
    cell, stats = figures.cell, figures.stats
    row: dict[str, Any] = {"task": task, "index": index, "method": cell.method, "ratio": cell.ratio}
    row.update(budget=cell.budget, spec=str(figures.spec))
    if outcome.nll is not None:
        nll, n_tokens = outcome.nll
        row.update(
            prediction=None,
            references=[],
            metric="perplexity",
            score=None,
            nll=nll,
            n_tokens=n_tokens,
            perplexity=math.exp(nll / n_tokens),
        )
    else:
        assert outcome.answer is not None
        row.update(
            prediction=outcome.answer.text,
            references=list(sample.references),
            metric=sample.metric,
            score=sample.score(outcome.answer.text),
            generated_tokens=len(outcome.answer.token_ids),
        )
    row.update(
        context_tokens=figures.context_length,
        kv_tokens_before=stats.kv_tokens_before,
        kv_tokens_after=stats.kv_tokens_after,
        kv_bytes_before=stats.kv_bytes_before,
        kv_bytes_after=stats.kv_bytes_after,
        prefill_s=round(figures.prefill_s, 5),
        score_s=round(stats.compress_s, 5),
        eval_s=round(outcome.eval_s, 5),
        cell_s=round(timing["cell_s"], 5),
        shared_prefill=timing["shared_prefill"],
        prefill_cells=timing["prefill_cells"],
        seed=config.seed,
        length=config.length,
        model=config.model,
        metadata={k: v for k, v in sample.metadata.items() if k != "continuation"},
        versions=dict(versions),
    )
    return row
