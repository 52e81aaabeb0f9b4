"""A benchmark run on a Ray cluster: the same plan as a local run, the samples spread over actors.

The unit of work is one sample with all its pending cells, so its shared prefill stays shared.
Each worker is a Ray actor that loads the model once and returns a sample's rows when the sample is
done; the driver alone appends them to ``results.jsonl``, so resuming, the config check and the
report work unchanged, and a run may be resumed locally or on Ray interchangeably. A worker that
dies mid-sample (killed, out of memory) costs only that sample: the rows of a sample are written
only once all of them are back, the worker is replaced, and the sample is retried (at most
``max_retries`` times, then recorded in ``failures.jsonl`` with its error while the run goes on).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.plan import Work, plan_work
from kvtrim.bench.results import RESULTS_FILE, ResultsWriter, check_config, read_results, row_key
from kvtrim.bench.run import RunSummary
from kvtrim.bench.tasks.sample import Sample
from kvtrim.core.errors import KVTrimError

FAILURES_FILE = "failures.jsonl"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` ``local`` starts a Ray instance here, ``auto`` or an address
    joins a running cluster."""

    address: str = "local"
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 2


class BenchWorker:
    """One Ray actor: the model loaded once, answering whole samples."""

    def __init__(self, model: str | None, config: BenchConfig, share: bool, cell_batch: int, threads: int):
        import torch

        from kvtrim.bench.evaluate import CellEvaluator
        from kvtrim.models import load_model

        torch.set_num_threads(max(1, threads))
        loaded, tokenizer = load_model(model)
        self.evaluator = CellEvaluator(loaded, tokenizer, config, share=share, cell_batch=cell_batch)

    def where(self) -> tuple[str, int]:
        return socket.gethostname(), os.getpid()

    def run(self, task: str, index: int, sample: Sample, cells: list) -> list[dict[str, Any]]:
        return list(self.evaluator.run(task, index, sample, cells))


def ray_module() -> Any:
    try:
        import ray
    except ImportError as err:
        raise KVTrimError("--ray needs Ray: pip install 'kvtrim[ray]' (or pip install ray).") from err
    return ray


@dataclass
class _Slot:
    """One worker's actor and what it has done."""

    actor: Any
    host: str = "?"
    pid: int = 0
    samples: int = 0
    busy_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def run_bench_on_ray(
    model: str | None,
    config: BenchConfig,
    out_dir: str | Path,
    samples: Mapping[str, Sequence[Sample]],
    options: RayOptions,
    *,
    share: bool = True,
    cell_batch: int = 1,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[list[Any]], None] | None = None,
) -> RunSummary:
    """Run (or resume) the benchmark into ``out_dir`` on Ray (see the module docstring).

    ``on_start`` receives the actors once they are up (tests use it to kill one)."""
    ray = ray_module()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    existing = read_results(out / RESULTS_FILE, repair=True)
    plan, skipped = plan_work(config, samples, {row_key(r) for r in existing}, 1)
    started_here = not ray.is_initialized()
    if started_here:
        address = None if options.address == "local" else options.address
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    remote = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)(BenchWorker)
    threads = max(1, int(options.cpus_per_worker))

    def new_slot() -> _Slot:
        return _Slot(remote.remote(model, config, share, cell_batch, threads))

    slots = [new_slot() for _ in range(max(1, min(options.workers, len(plan) or 1)))]
    try:
        written = _drive(ray, slots, new_slot, plan, out, existing, options, progress, on_row, on_start)
    finally:
        for slot in slots:
            ray.kill(slot.actor)
        if started_here:
            ray.shutdown()
    return RunSummary(out, existing, written, skipped, time.perf_counter() - start)


def _drive(
    ray: Any,
    slots: list[_Slot],
    new_slot: Callable[[], _Slot],
    plan: list[Work],
    out: Path,
    rows: list[dict[str, Any]],
    options: RayOptions,
    progress: bool,
    on_row: Callable[[dict[str, Any]], None] | None,
    on_start: Callable[[list[Any]], None] | None,
) -> int:
    """Keep every worker busy with one sample; write each finished sample's rows; retry the dead."""
    queue = deque(plan)
    attempts: dict[tuple[str, int], int] = {}
    running: dict[Any, tuple[int, Work, float]] = {}
    writer, failures = ResultsWriter(out / RESULTS_FILE), out / FAILURES_FILE
    bar = tqdm(
        total=sum(len(w.pending) for w in plan),
        desc="kvtrim bench (ray)",
        unit="cell",
        file=sys.stderr,
        disable=not progress,
    )
    written = 0

    def feed(i: int) -> None:
        if queue:
            work = queue.popleft()
            ref = slots[i].actor.run.remote(work.task, work.index, work.sample, work.pending)
            running[ref] = (i, work, time.perf_counter())

    try:
        for slot in slots:
            slot.host, slot.pid = ray.get(slot.actor.where.remote())
        if on_start is not None:
            on_start([slot.actor for slot in slots])
        for i in range(len(slots)):
            feed(i)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            i, work, began = running.pop(ready[0])
            try:
                sample_rows = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                _lost(bar, work, err, attempts, queue, failures, options.max_retries, slots[i])
                slots[i] = new_slot()
                slots[i].host, slots[i].pid = ray.get(slots[i].actor.where.remote())
                feed(i)
                continue
            except ray.exceptions.RayTaskError as err:  # the sample itself failed: record it, go on
                _record_failure(failures, work, err.cause if err.cause is not None else err)
                bar.write(f"kvtrim bench: {work.task} #{work.index} failed: {err.cause!r}")
                feed(i)
                continue
            for row in sample_rows:
                writer.write(row)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            written += len(sample_rows)
            bar.update(len(sample_rows))
            slot = slots[i]
            slot.samples += 1
            slot.busy_s += time.perf_counter() - began
            bar.write(
                f"worker {i} ({slot.host}, pid {slot.pid}): {slot.samples} samples, "
                f"{slot.busy_s / slot.samples:.1f} s/sample"
            )
            feed(i)
    finally:
        bar.close()
        writer.close()
    return written


def _lost(
    bar: Any,
    work: Work,
    err: Exception,
    attempts: dict,
    queue: deque,
    failures: Path,
    max_retries: int,
    slot: _Slot,
) -> None:
    """A worker died with ``work`` in hand: retry it elsewhere, or record it once out of retries."""
    key = (work.task, work.index)
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] <= max_retries:
        bar.write(
            f"kvtrim bench: worker on {slot.host} (pid {slot.pid}) died during {work.task} "
            f"#{work.index}; retrying it ({attempts[key]}/{max_retries})"
        )
        queue.appendleft(work)
    else:
        _record_failure(failures, work, err)
        bar.write(
            f"kvtrim bench: {work.task} #{work.index} failed {attempts[key]} times; recorded in "
            f"{FAILURES_FILE}, the run goes on"
        )


def _record_failure(path: Path, work: Work, err: BaseException) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {
                    "task": work.task,
                    "index": work.index,
                    "error": f"{type(err).__name__}: {err}",
                    "time": time.time(),
                }
            )
            + "\n"
        )
