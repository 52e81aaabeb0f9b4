"""The order of a run: which (task, sample, pending cells) come when, and how they group.

Samples run in rounds of ``batch_size`` over the tasks, so an interrupted run covers every task
evenly; consecutive samples of one task with the same pending cells form a batch; a sample's cells
are answered in chunks of one budget and ratio (their kept counts are alike, so their rows need
little padding in a cell batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.results import Key
from kvtrim.bench.tasks.sample import Sample
from kvtrim.core.spec import Cell


@dataclass
class Work:
    """One sample with the cells it still needs."""

    task: str
    index: int
    sample: Sample
    pending: list[Cell]


def plan_work(
    config: BenchConfig, samples: Mapping[str, Sequence[Sample]], done: set[Key], batch_size: int
) -> tuple[list[Work], int]:
    """The work still to do, in rounds over the tasks, and how many cells are already done."""
    plan: list[Work] = []
    skipped = 0
    rounds = max((len(items) for items in samples.values()), default=0)
    for first in range(0, rounds, batch_size):
        for task, items in samples.items():
            cells = config.task_cells(task)
            for index in range(first, min(first + batch_size, len(items))):
                pending = [c for c in cells if (task, index, *c) not in done]
                skipped += len(cells) - len(pending)
                if pending:
                    plan.append(Work(task, index, items[index], pending))
    return plan, skipped


def batches(
    plan: Sequence[Work], batch_size: int
) -> Iterator[tuple[str, list[tuple[int, Sample]], list[Cell]]]:
    """Group consecutive samples of the same task with the same pending cells, up to batch_size."""
    group: list[tuple[int, Sample]] = []
    key: tuple[str, list[Cell]] | None = None
    for work in plan:
        if key is not None and (key != (work.task, work.pending) or len(group) == batch_size):
            yield key[0], group, key[1]
            group = []
        key = (work.task, work.pending)
        group.append((work.index, work.sample))
    if key is not None and group:
        yield key[0], group, key[1]


def cell_chunks(cells: Sequence[Cell], size: int) -> list[list[Cell]]:
    """Cells in batches of at most ``size``, each drawn from as few (budget, ratio) groups as can be.

    Each group is split into balanced chunks, and consecutive chunks are merged when they fit
    together (e.g. the single uncompressed cell joins a group).
    """
    groups: dict[tuple[bool, str, float], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell[2] != "uniform", cell[2], cell[1]), []).append(cell)
    chunks: list[list[Cell]] = []
    for key in sorted(groups):
        group = groups[key]
        parts = -(-len(group) // size)
        for part in range(parts):
            piece = group[part * len(group) // parts : (part + 1) * len(group) // parts]
            if chunks and len(chunks[-1]) + len(piece) <= size:
                chunks[-1].extend(piece)
            else:
                chunks.append(list(piece))
    return chunks
