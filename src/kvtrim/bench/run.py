"""Running (or resuming) a benchmark into a folder: every (task sample × method × ratio × budget)
cell, rows streamed to ``results.jsonl`` as they are done, with a progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.evaluate import CellEvaluator
from kvtrim.bench.plan import Work, batches, plan_work
from kvtrim.bench.results import RESULTS_FILE, ResultsWriter, check_config, read_results, row_key
from kvtrim.bench.samples import build_samples
from kvtrim.bench.tasks.sample import Sample
from kvtrim.core.errors import KVTrimError


@dataclass
class RunSummary:
    out_dir: Path
    rows: list[dict[str, Any]]  # every row of the folder, old and new
    written: int  # rows this call added
    skipped: int  # cells already in the folder
    wall_s: float


def run_bench(
    model: Any,
    tokenizer: Any,
    config: BenchConfig,
    out_dir: str | Path,
    *,
    share: bool = True,
    progress: bool = True,
    samples: Mapping[str, Sequence[Sample]] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    batch_size: int = 1,
    cell_batch: int = 1,
) -> RunSummary:
    """Run (or resume) the benchmark into ``out_dir``.

    ``share=False`` gives every cell its own prefill (same rows, slower: the reference the shared
    path is checked against). ``samples`` replaces the generated ones (tests, custom data).
    ``batch_size=N`` answers up to N samples of a task together in one left-padded batch (same
    rows up to float rounding; cells a batch cannot hold run sample by sample). ``cell_batch=N``
    answers up to N cells of one sample together (same rows up to float rounding, 2-3x faster on
    a CPU: benchmarks/cell_batch_speed.py).
    """
    if batch_size < 1:
        raise KVTrimError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    results = out / RESULTS_FILE
    existing = read_results(results, repair=True)
    done = {row_key(r) for r in existing}
    if samples is None:
        samples = build_samples(config, tokenizer)
    plan, skipped = plan_work(config, samples, done, batch_size)
    evaluator = CellEvaluator(model, tokenizer, config, share=share, cell_batch=cell_batch)
    written = _stream(evaluator, plan, batch_size, results, existing, progress, on_row)
    return RunSummary(out, existing, written, skipped, time.perf_counter() - start)


def _stream(
    evaluator: CellEvaluator,
    plan: list[Work],
    batch_size: int,
    results: Path,
    rows: list[dict[str, Any]],
    progress: bool,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> int:
    """Evaluate the plan, appending every row to ``results`` (and ``rows``) as soon as it is done."""
    writer = ResultsWriter(results)
    written = 0
    total = sum(len(w.pending) for w in plan)
    bar = tqdm(total=total, desc="kvtrim bench", unit="cell", file=sys.stderr, disable=not progress)
    try:
        for task, items, pending in batches(plan, batch_size):
            first, last = items[0][0], items[-1][0]
            bar.set_postfix_str(
                f"{task} #{first}" if first == last else f"{task} #{first}-{last}", refresh=False
            )
            for row in evaluator.run_batch(task, items, pending):
                writer.write(row)
                rows.append(row)
                written += 1
                bar.update(1)
                if on_row is not None:
                    on_row(row)
    finally:
        bar.close()
        writer.close()
    return written
