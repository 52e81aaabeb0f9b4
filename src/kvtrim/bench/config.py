"""A benchmark run's configuration: everything that decides its rows, stored as ``DIR/config.json``
and checked on resume. Methods and budgets are canonical labels (``expected-attention:epsilon=0.01``)."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from kvtrim.bench.tasks.registry import DEFAULT_GRID_DEPTHS, expand_task_list
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import check_ratio
from kvtrim.core.spec import Cell, CompressionSpec, format_named, parse_named
from kvtrim.scorers import make_scorer
from kvtrim.strategies.planner import check_sweep_budget, plan

DATASETS = ("generated", "ruler", "longbench")
EXTRA_TASKS = ("perplexity", "needle_grid")
#: ratio 0 and method ``none`` keep every pair whatever the budget: one cell, evaluated once per sample
BASELINE = Cell("none", 0.0, "uniform")


def canonical_label(label: str) -> str:
    """``name:key=value`` with the options in canonical form and order."""
    return format_named(*parse_named(label))


@dataclass
class BenchConfig:
    """Everything that decides a run's rows; stored as ``DIR/config.json`` and checked on resume."""

    tasks: list[str]
    methods: list[str]
    ratios: list[float]
    budgets: list[str] = field(default_factory=lambda: ["uniform"])
    length: int = 4096
    samples: int = 10
    seed: int = 0
    model: str = "embedded:SmolLM2-135M-Instruct"
    dataset: str = "generated"  # or "ruler" / "longbench": published data read by bench.tasks.loaders
    data: str | None = None  # local path or hub id of the published data (default: the hub id)
    max_new_tokens: int | None = None  # caps each sample's own answer budget
    answer_prefix: bool = True  # continue the task's answer prefix (after the assistant tag)
    chat_template: bool | None = None  # None: use the tokenizer's template when it has one
    haystack_file: str | None = None
    data_files: dict[str, str] = field(default_factory=dict)  # qa_1 / qa_2 source files
    grid_lengths: list[int] = field(default_factory=list)  # needle_grid; empty: [length]
    grid_depths: list[float] = field(default_factory=lambda: list(DEFAULT_GRID_DEPTHS))
    grid_samples: int = 1
    ppl_tokens: int = 256  # continuation tokens scored by the perplexity task
    ppl_text: str | None = None  # default: the bundled essays
    windows: bool = False  # every cell compresses sliding-window layers too (/windows), each alone

    def __post_init__(self) -> None:
        if not self.tasks:
            raise KVTrimError("No task to run; name tasks with --tasks (e.g. 'ruler' or 'niah_single_1,vt').")
        if not self.methods:
            raise KVTrimError("No method to run; name methods with --methods (see `kvtrim methods`).")
        for method in self.methods:
            make_scorer(method)
        self.methods = list(dict.fromkeys(canonical_label(m) for m in self.methods))
        self.ratios = sorted(dict.fromkeys(check_ratio(r) for r in self.ratios))
        if not self.ratios:
            raise KVTrimError("No ratio to run; give --ratios (e.g. 0,0.5).")
        for budget in self.budgets:
            check_sweep_budget(budget)  # its name and options, checked now rather than at the first sample
        self.budgets = list(dict.fromkeys(canonical_label(b) for b in self.budgets))
        if not self.budgets:
            raise KVTrimError("No budget to run; give --budgets (e.g. uniform,adaptive).")
        self._check_sizes()
        if self.windows:  # every combination error now, not at the first sample
            for cell in self.cells():
                plan(
                    CompressionSpec.from_cell(
                        cell, windows=True, query_aware=make_scorer(cell.method).query_aware
                    )
                )

    def _check_sizes(self) -> None:
        if self.length < 1 or self.samples < 1 or self.grid_samples < 1:
            raise KVTrimError("length, samples and grid samples must be positive.")
        if self.dataset not in DATASETS:
            raise KVTrimError(f"Unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise KVTrimError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.ppl_tokens < 2:
            raise KVTrimError(f"The perplexity continuation needs >= 2 tokens, got {self.ppl_tokens}.")
        for depth in self.grid_depths:
            if not 0.0 <= depth <= 1.0:
                raise KVTrimError(f"Needle depths must be in [0, 1], got {depth}.")

    def cells(self) -> list[Cell]:
        """The (method, ratio, budget) cells of every sample; ratio 0 and ``none`` collapse into one."""
        cells: list[Cell] = []
        if "none" in self.methods or 0.0 in self.ratios:
            cells.append(BASELINE)
        cells += [
            Cell(m, r, b)
            for m in self.methods
            if m != "none"
            for b in self.budgets
            for r in self.ratios
            if r > 0
        ]
        return cells

    def task_cells(self, task: str) -> list[Cell]:
        """The cells of one task's samples: perplexity has no question, so no query-aware cell."""
        if task != "perplexity":
            return self.cells()
        return [c for c in self.cells() if not make_scorer(c.method).query_aware]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Default values of the optional fields, as stored in config.json."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = f.default_factory()
        return json.loads(json.dumps(out))


def resolve_tasks(
    spec: str | Sequence[str], dataset: str = "generated", data_files: Mapping[str, str] | None = None
) -> list[str]:
    """Task names from a spec ("ruler", "niah_single_1,vt", "perplexity", "needle_grid", or a mix).

    For published data sets the names are checked when the data is read (``ruler`` / ``longbench``
    stand for every task the data holds)."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise KVTrimError("Empty task list; name tasks (e.g. 'niah_single_1,vt') or the group 'ruler'.")
    extra = [p for p in parts if p in EXTRA_TASKS]
    rest = [p for p in parts if p not in EXTRA_TASKS]
    if dataset == "generated":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = expand_task_list(rest, data_files) if rest else []
        for warning in caught:
            print(f"kvtrim: {warning.message}", file=sys.stderr)
    else:
        names = list(dict.fromkeys(rest))
    return names + list(dict.fromkeys(extra))
