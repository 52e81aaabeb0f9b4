"""The benchmark's task registry: RULER's 13 tasks, passkey, and needle grids, generated offline.

Every task is generated in the evaluated model's tokenizer so that prompt + reserved answer tokens
fit the target length (RULER's rule), deterministically from a seed, without network access.

>>> samples = generate("niah_single_1", tokenizer, length=4096, n_samples=20, seed=0)
>>> samples[0].score(model_output)  # 0..100
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from kvtrim.bench.tasks.metrics import METRICS, string_match_all, string_match_part
from kvtrim.bench.tasks.niah import NIAH_CONFIGS, niah_builder
from kvtrim.bench.tasks.qa import QA_DATASETS, generate_qa, load_hotpotqa, load_squad
from kvtrim.bench.tasks.ruler import cwe_builder, cwe_size_range, fwe_builder, passkey_builder, vt_builder
from kvtrim.bench.tasks.sample import Builder, Sample, generate_fitted
from kvtrim.core.errors import KVTrimError

__all__ = [
    "METRICS",
    "RULER_TASKS",
    "TASKS",
    "Sample",
    "expand_task_list",
    "generate",
    "load_hotpotqa",
    "load_squad",
    "needle_grid",
    "string_match_all",
    "string_match_part",
]

PathLike = str | Path


class TaskGenerator(Protocol):
    def __call__(
        self,
        tokenizer: Any,
        length: int,
        n_samples: int,
        seed: int = 0,
        haystack_file: PathLike | None = None,
        *,
        data_file: PathLike | None = None,
        extra_tokens: int = 0,
    ) -> list[Sample]: ...


def _fitted(
    task: str, make: Callable[[Any, int, int, str | None], Builder], lo: int = 0, hi: int | None = None
) -> TaskGenerator:
    """A generator for a task whose builder is ``make(tokenizer, length, seed, haystack_file)``."""

    def gen(tokenizer, length, n_samples, seed=0, haystack_file=None, *, data_file=None, extra_tokens=0):
        hay = None if haystack_file is None else str(haystack_file)
        build = make(tokenizer, length, seed, hay)
        return generate_fitted(task, tokenizer, length, n_samples, seed, build, lo, hi, extra_tokens)

    return gen


def _qa(task: str) -> TaskGenerator:
    def gen(tokenizer, length, n_samples, seed=0, haystack_file=None, *, data_file=None, extra_tokens=0):
        return generate_qa(task, tokenizer, length, n_samples, seed, data_file, extra_tokens)

    return gen


def _niah(task: str) -> TaskGenerator:
    return _fitted(task, lambda tok, length, seed, hay: niah_builder(task, NIAH_CONFIGS[task], hay))


TASKS: dict[str, TaskGenerator] = {
    **{name: _niah(name) for name in NIAH_CONFIGS},
    "vt": _fitted("vt", lambda tok, length, seed, hay: vt_builder("vt", tok, seed)),
    "cwe": _fitted("cwe", lambda tok, length, seed, hay: cwe_builder("cwe", length), *cwe_size_range()),
    "fwe": _fitted("fwe", lambda tok, length, seed, hay: fwe_builder("fwe", length), lo=1),
    "qa_1": _qa("qa_1"),
    "qa_2": _qa("qa_2"),
    "passkey": _fitted("passkey", lambda tok, length, seed, hay: passkey_builder("passkey")),
}
#: needle depths of a needle grid unless given (0 = the start of the haystack, 1 = its end)
DEFAULT_GRID_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RULER_TASKS: tuple[str, ...] = (*NIAH_CONFIGS, "vt", "cwe", "fwe", "qa_1", "qa_2")
GROUPS: dict[str, tuple[str, ...]] = {"ruler": RULER_TASKS, "niah": tuple(NIAH_CONFIGS)}


def generate(
    task: str,
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int = 0,
    haystack_file: PathLike | None = None,
    *,
    data_file: PathLike | None = None,
    extra_tokens: int = 0,
) -> list[Sample]:
    """``n_samples`` samples of ``task`` whose prompt + answer reserve + ``extra_tokens`` fit ``length``
    tokens of ``tokenizer``. ``haystack_file``: prose replacing the bundled essays (essay tasks);
    ``data_file``: the SQuAD / HotpotQA dev file (qa_1 / qa_2)."""
    if task not in TASKS:
        raise KVTrimError(f"unknown task {task!r}; choose from {', '.join(TASKS)} (or the group 'ruler').")
    if length <= 0 or n_samples < 0:
        raise KVTrimError(f"length must be positive and n_samples non-negative (got {length}, {n_samples}).")
    return TASKS[task](
        tokenizer, length, n_samples, seed, haystack_file, data_file=data_file, extra_tokens=extra_tokens
    )


def expand_task_list(
    spec: str | Iterable[str], data_files: Mapping[str, PathLike] | None = None
) -> list[str]:
    """Task names from "ruler", "niah" or a comma-separated list ("niah_single_1,vt"), in order,
    without duplicates. In a group, qa tasks without a file in ``data_files`` (keys "qa_1" / "qa_2")
    are skipped with a warning; a qa task named explicitly without its file is an error."""
    data_files = data_files or {}
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise KVTrimError("empty task list; name tasks (e.g. 'niah_single_1,vt') or the group 'ruler'.")
    names: list[str] = []
    for part in parts:
        if part in GROUPS:
            for name in GROUPS[part]:
                if name in QA_DATASETS and name not in data_files:
                    warnings.warn(
                        f"skipping {name}: it needs the {QA_DATASETS[name]} file, which kvtrim does not "
                        "bundle; pass it to run this task.",
                        stacklevel=2,
                    )
                    continue
                names.append(name)
        elif part in TASKS:
            if part in QA_DATASETS and part not in data_files:
                raise KVTrimError(f"{part} needs the {QA_DATASETS[part]} file; pass it, or drop {part}.")
            names.append(part)
        else:
            raise KVTrimError(f"unknown task {part!r}; choose from {', '.join([*GROUPS, *TASKS])}.")
    return list(dict.fromkeys(names))


def needle_grid(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 0,
    *,
    n_per_cell: int = 1,
    extra_tokens: int = 0,
) -> list[Sample]:
    """niah_single_1-style samples at every (length, depth in [0, 1]) for a heat map. Cells share
    the same ``n_per_cell`` needles, so only length and depth change across the grid."""
    task = "needle_grid"
    samples: list[Sample] = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise KVTrimError(f"needle depth must be in [0, 1] (0 = start, 1 = end); got {depth}.")
            build = niah_builder(task, NIAH_CONFIGS["niah_single_1"], depth=depth)
            cell = generate_fitted(task, tokenizer, length, n_per_cell, seed, build, 0, None, extra_tokens)
            samples += [replace(s, metadata={**s.metadata, "target_depth": depth}) for s in cell]
    return samples
