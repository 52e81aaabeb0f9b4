"""The benchmark runner: every (task sample × method × ratio × budget) cell, one prefill per sample.

Why one prefill: kvtrim's methods are question-agnostic and evict only after each layer's attention
ran, so every cell of a sample sees the same prefill; :func:`kvtrim.shared_prefill.prefill_once`
scores it once per method, each budget picks every (method, ratio) cell's pairs from those scores,
and each cell gathers its own kept pairs from the full cache, bit-identical to compressing that cell
alone. A scorer that declares ``query_aware = True`` (``snapkv-query-aware``) compresses the question
with the context, so its cells share a second prefill per sample, question included; it has no cell
on ``perplexity``, which has no question.
KVzip, which scores with extra forwards after the prefill, runs them once on the shared full
cache for all its cells.

Ratio 0 and method ``none`` are the same cache (nothing evicted, whatever the budget), so they form
a single cell, ``("none", 0.0, "uniform")``, evaluated once per sample; reports draw it as every
method's ratio-0 point.

Results stream to ``DIR/results.jsonl``, one row per (task, sample index, method, ratio, budget),
written and flushed as soon as the cell is answered (rows written before budgets existed have no
``budget`` field and count as ``uniform``). A rerun with the same configuration (``DIR/config.json``)
skips the rows already there, so an interrupted run resumes where it stopped; a truncated last line
(the process died mid-write) is dropped and that cell is run again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvtrim.bench.sample import Sample
from kvtrim.budgets import check_ratio
from kvtrim.errors import KVTrimError

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
DATASETS = ("generated", "ruler", "longbench")
EXTRA_TASKS = ("perplexity", "needle_grid")
DEFAULT_GRID_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BASELINE = ("none", 0.0, "uniform")
#: budgets a sweep can use: those decided by the ratio alone (``tokens`` / ``threshold`` ignore it)
SWEEP_BUDGETS = ("uniform", "pyramid", "adaptive", "duo")  # the budgets driven by a ratio

Cell = tuple[str, float, str]  # (method, ratio, budget)
Key = tuple[str, int, str, float, str]  # (task, sample index, method, ratio, budget)


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
    dataset: str = "generated"  # or "ruler" / "longbench": published data read by bench.loaders
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

    def __post_init__(self) -> None:
        from kvtrim.methods import make_scorer

        if not self.tasks:
            raise KVTrimError("No task to run; name tasks with --tasks (e.g. 'ruler' or 'niah_single_1,vt').")
        if not self.methods:
            raise KVTrimError("No method to run; name methods with --methods (see `kvtrim methods`).")
        for method in self.methods:
            make_scorer(method)
        self.methods = list(dict.fromkeys(self.methods))
        self.ratios = sorted(dict.fromkeys(check_ratio(r) for r in self.ratios))
        if not self.ratios:
            raise KVTrimError("No ratio to run; give --ratios (e.g. 0,0.5).")
        self.budgets = list(dict.fromkeys(self.budgets))
        if not self.budgets:
            raise KVTrimError("No budget to run; give --budgets (e.g. uniform,adaptive).")
        from kvtrim.budgets import make_budget
        from kvtrim.specs import parse_spec

        for spec in self.budgets:
            budget = parse_spec(spec)[0]
            if budget in ("tokens", "threshold"):
                raise KVTrimError(
                    f"The {budget!r} budget ignores the ratio, which the bench sweeps; --budgets takes "
                    f"{', '.join(SWEEP_BUDGETS)}. Try it with `kvtrim ask --budget {budget}` instead."
                )
            if budget not in SWEEP_BUDGETS:
                raise KVTrimError(f"Unknown budget {budget!r}; --budgets takes {', '.join(SWEEP_BUDGETS)}.")
            make_budget(spec)  # its options, checked now rather than at the first sample
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
            (m, r, b) for m in self.methods if m != "none" for b in self.budgets for r in self.ratios if r > 0
        ]
        return cells

    def task_cells(self, task: str) -> list[Cell]:
        """The cells of one task's samples: perplexity has no question, so no query-aware cell."""
        if task != "perplexity":
            return self.cells()
        from kvtrim.methods import make_scorer

        return [c for c in self.cells() if not make_scorer(c[0]).query_aware]

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
    from kvtrim.bench.tasks import expand_task_list

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


# --- the results file -------------------------------------------------------------------------


def row_key(row: Mapping[str, Any]) -> Key:
    """(task, index, method, ratio, budget); rows from before the budget axis are ``uniform``."""
    budget = str(row.get("budget") or "uniform")
    return (str(row["task"]), int(row["index"]), str(row["method"]), float(row["ratio"]), budget)


def read_results(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a results.jsonl. A last line cut short by an interruption is ignored (and cut off
    the file when ``repair``, so appending starts on a clean line); a bad line before it is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    offset = 0
    keep_until = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        end = offset + len(line) + (1 if number < len(lines) else 0)
        if line.strip():
            try:
                rows.append(json.loads(line))
                keep_until = end
            except json.JSONDecodeError as err:
                if any(rest.strip() for rest in lines[number:]):
                    raise KVTrimError(
                        f"{path} line {number} is corrupt ({err}); fix or delete that line to resume."
                    ) from err
                break  # the interrupted last row
        else:
            keep_until = end
        offset = end
    if repair and keep_until < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep_until)
    if repair and rows and not path.read_bytes().endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return rows


class ResultsWriter:
    """Appends one JSON row per line, flushed at once, so a crash loses at most the row being written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def check_config(out_dir: Path, config: BenchConfig) -> None:
    """Store the configuration in a new folder, or refuse one whose stored configuration differs."""
    path = out_dir / CONFIG_FILE
    wanted = config.to_dict()
    if path.is_file():
        # A field the stored file lacks was added since that run, which used its default (old
        # folders have no ``budgets``: they ran the uniform budget only).
        stored = {**BenchConfig.defaults(), **json.loads(path.read_text(encoding="utf-8"))}
        if stored != wanted and read_results(out_dir / RESULTS_FILE):
            diffs = [
                f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now"
                for k in sorted(set(stored) | set(wanted))
                if stored.get(k) != wanted.get(k)
            ]
            raise KVTrimError(
                f"{out_dir} holds a run with a different configuration ({'; '.join(diffs)}). "
                "Rerun with the same options to resume it, or choose another --out folder."
            )
        if stored == wanted:
            return
    elif read_results(out_dir / RESULTS_FILE):
        raise KVTrimError(f"{out_dir} has {RESULTS_FILE} but no {CONFIG_FILE}; choose another --out folder.")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- samples ----------------------------------------------------------------------------------


def uses_chat_template(tokenizer: Any, config: BenchConfig, task: str) -> bool:
    """Perplexity reads raw text, so it never gets a chat template."""
    from kvtrim.prompting import has_chat_template

    if task == "perplexity":
        return False
    return has_chat_template(tokenizer) if config.chat_template is None else config.chat_template


def template_tokens(tokenizer: Any, chat_template: bool) -> int:
    """Tokens the prompt layout adds around context and question (RULER counts them in the length)."""
    from kvtrim.prompting import encode, layout_for

    layout = layout_for(tokenizer, "", chat_template)
    return len(encode(tokenizer, layout.context_text, layout.add_special_tokens)) + len(
        encode(tokenizer, layout.question_text(""))
    )


def build_samples(config: BenchConfig, tokenizer: Any) -> dict[str, list[Sample]]:
    """Every task's samples, deterministic from the configuration's seed."""
    from kvtrim.bench import loaders
    from kvtrim.bench.perplexity import perplexity_samples
    from kvtrim.bench.tasks import generate, needle_grid

    chat = uses_chat_template(tokenizer, config, "")
    extra = template_tokens(tokenizer, chat)
    out: dict[str, list[Sample]] = {}
    data_tasks = [t for t in config.tasks if t not in EXTRA_TASKS]
    if config.dataset == "ruler" and data_tasks:
        out.update(
            loaders.load_ruler(config.data or loaders.RULER_HUB_ID, data_tasks, config.samples, config.length)
        )
    elif config.dataset == "longbench" and data_tasks:
        loaded = loaders.load_longbench(config.data or loaders.LONGBENCH_HUB_ID, data_tasks, config.samples)
        for task, items in loaded.items():
            out[task] = [loaders.truncate_middle(tokenizer, s, config.length, extra) for s in items]
    for task in config.tasks:
        if task == "perplexity":
            out[task] = perplexity_samples(
                tokenizer,
                config.length,
                config.samples,
                config.seed,
                config.ppl_text,
                config.ppl_tokens,
                extra_tokens=template_tokens(tokenizer, False),
            )
        elif task == "needle_grid":
            out[task] = needle_grid(
                tokenizer,
                config.grid_lengths or [config.length],
                config.grid_depths,
                config.seed,
                n_per_cell=config.grid_samples,
                extra_tokens=extra,
            )
        elif config.dataset == "generated":
            out[task] = generate(
                task,
                tokenizer,
                config.length,
                config.samples,
                config.seed,
                config.haystack_file,
                data_file=config.data_files.get(task),
                extra_tokens=extra,
            )
    return {task: out[task] for task in out}


# --- evaluation -------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from kvtrim import __version__

    return {"kvtrim": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _jsonable_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "continuation"}


@dataclass
class CellEvaluator:
    """Answers (or scores the continuation of) one sample under each of its pending cells."""

    model: Any
    tokenizer: Any
    config: BenchConfig
    share: bool = True
    versions: dict[str, str] = field(default_factory=_versions)
    #: answer up to this many cells of a sample in one batch (:mod:`kvtrim.cell_batch`); 1 = one by one
    cell_batch: int = 1

    def __post_init__(self) -> None:
        from kvtrim.methods import make_scorer

        if self.cell_batch < 1:
            raise KVTrimError(f"cell_batch must be >= 1, got {self.cell_batch}")
        names = ["none", *self.config.methods]
        self.scorers = {name: make_scorer(name) for name in dict.fromkeys(names)}
        if any(b != "uniform" for b in self.config.budgets) or self.cell_batch > 1:
            # Every cell — shared or alone, whatever its budget — then runs on the same attention
            # function, so the order cells are run in cannot change a row.
            from kvtrim import ragged

            ragged.enable(self.model)

    def shares(self, method: str) -> bool:
        """Whether ``method``'s cells take their caches from one prefill per sample: every method
        when sharing is on (KVzip's reconstruction then runs once on the shared full cache, for all
        its cells). Query-aware methods share a prefill of their own, the question included."""
        return self.share

    def run(self, task: str, index: int, sample: Sample, cells: Sequence[Cell]) -> Iterator[dict]:
        """Rows of the pending ``cells`` of one sample, each yielded as soon as it is done."""
        import kvtrim

        chat = uses_chat_template(self.tokenizer, self.config, task)
        if self.share:
            agnostic = [c for c in cells if not self.scorers[c[0]].query_aware]
            aware = [c for c in cells if self.scorers[c[0]].query_aware]
            if agnostic:
                yield from self._run_shared(task, index, sample, agnostic, chat, None)
            if aware:
                yield from self._run_shared(task, index, sample, aware, chat, sample.question)
            return
        for method, ratio, budget in cells:
            start = time.perf_counter()
            scorer = self.scorers[method]
            session = kvtrim.compress(
                self.model,
                self.tokenizer,
                sample.context,
                method=scorer,
                ratio=ratio,
                budget=budget,
                use_chat_template=chat,
                seed=self.config.seed,
                # query-aware: the question is prefilled and compressed after the context
                question=sample.question if scorer.query_aware else None,
            )
            session.method, session.budget = method, budget  # the cell's labels, options included
            yield self._row(task, index, sample, session, chat, False, 1, 0.0, start)

    def _run_shared(
        self, task: str, index: int, sample: Sample, cells: Sequence[Cell], chat: bool, question: str | None
    ) -> Iterator[dict]:
        """Rows of ``cells`` from one prefill of the sample (with ``question`` after the context for
        query-aware methods), answered one by one or in cell batches."""
        from kvtrim.shared_prefill import prefill_once

        start = time.perf_counter()
        prefill = prefill_once(
            self.model,
            self.tokenizer,
            sample.context,
            {m: self.scorers[m] for m in dict.fromkeys(m for m, _, _ in cells)},
            list(dict.fromkeys(r for _, r, _ in cells)),
            budgets=list(dict.fromkeys(b for _, _, b in cells)),
            use_chat_template=chat,
            seed=self.config.seed,
            question=question,
        )
        setup_s = time.perf_counter() - start
        if self.cell_batch == 1 or task == "perplexity":
            for method, ratio, budget in cells:
                start = time.perf_counter()
                session = prefill.session(method, ratio, budget)
                yield self._row(task, index, sample, session, chat, True, len(cells), setup_s, start)
                setup_s = 0.0  # the shared prefill's wall time is charged to its first cell
            return
        from kvtrim.cell_batch import answer_cells

        prefix, limit = self._answer_args(sample, chat)
        for chunk in _cell_chunks(cells, self.cell_batch):
            start = time.perf_counter()
            sessions = [prefill.session(*cell) for cell in chunk]
            answers = answer_cells(sessions, sample.question, limit, prefix)
            share = (time.perf_counter() - start) / len(chunk)
            for session, answer in zip(sessions, answers, strict=True):
                row = self._row(
                    task,
                    index,
                    sample,
                    _Answered(session, answer),
                    chat,
                    True,
                    len(cells),
                    setup_s,
                    time.perf_counter() - share,
                )
                row["cell_batch"] = len(chunk)
                yield row
                setup_s = 0.0
        del prefill

    def _answer_args(self, sample: Sample, chat: bool) -> tuple[str, int]:
        """The answer prefix and the new-token budget a sample is answered with."""
        prefix = sample.answer_prefix if self.config.answer_prefix else ""
        if chat:
            prefix = prefix.lstrip()  # the assistant turn starts fresh after its tag
        budget = sample.max_new_tokens
        if self.config.max_new_tokens is not None:
            budget = min(budget, self.config.max_new_tokens)
        return prefix, budget

    def batchable(self, task: str, cell: Cell) -> bool:
        """Whether a cell can run in a left-padded batch (see :mod:`kvtrim.batch`)."""
        from kvtrim.batch import check_batchable
        from kvtrim.budgets import make_budget

        if task == "perplexity" or self.scorers[cell[0]].query_aware:
            return False
        try:
            check_batchable(self.model, make_budget(cell[2]))
        except KVTrimError:
            return False
        return True

    def run_batch(
        self, task: str, items: Sequence[tuple[int, Sample]], cells: Sequence[Cell]
    ) -> Iterator[dict]:
        """Rows of several samples of one task at once: the batchable cells in one left-padded
        batch (one shared prefill for all of them), the others sample by sample."""
        import kvtrim
        from kvtrim.shared_batch import prefill_batch_once

        batched = [c for c in cells if self.batchable(task, c)] if len(items) > 1 else []
        rest = [c for c in cells if c not in batched]
        if batched:
            chat = uses_chat_template(self.tokenizer, self.config, task)
            samples = [sample for _, sample in items]
            contexts = [sample.context for sample in samples]
            args = [self._answer_args(sample, chat) for sample in samples]
            shared = self.share
            setup_s = 0.0
            if shared:
                start = time.perf_counter()
                methods = list(dict.fromkeys(m for m, _, _ in batched))
                prefill = prefill_batch_once(
                    self.model,
                    self.tokenizer,
                    contexts,
                    {m: self.scorers[m] for m in methods},
                    list(dict.fromkeys(r for _, r, _ in batched)),
                    budgets=list(dict.fromkeys(b for _, _, b in batched)),
                    use_chat_template=chat,
                    seed=self.config.seed,
                )
                setup_s = time.perf_counter() - start
            for method, ratio, budget in batched:
                start = time.perf_counter()
                if shared:
                    session = prefill.session(method, ratio, budget)
                else:
                    session = kvtrim.compress(
                        self.model,
                        self.tokenizer,
                        contexts,
                        method=self.scorers[method],
                        ratio=ratio,
                        budget=budget,
                        use_chat_template=chat,
                        seed=self.config.seed,
                    )
                answers = session.answer(
                    [sample.question for sample in samples],
                    max_new_tokens=[budget for _, budget in args],
                    answer_prefix=[prefix for prefix, _ in args],
                )
                for b, (index, sample) in enumerate(items):
                    element = _BatchElement(session, b, answers[b])
                    cells_per_prefill = len(batched) if shared else 1
                    row = self._row(
                        task, index, sample, element, chat, shared, cells_per_prefill, setup_s, start
                    )
                    row["batch_size"] = len(items)
                    yield row
                    setup_s = 0.0  # the shared prefill's wall time is charged to its first row
            if shared:
                del prefill
        if rest:
            for index, sample in items:
                yield from self.run(task, index, sample, rest)

    def _row(
        self,
        task: str,
        index: int,
        sample: Sample,
        session: Any,
        chat: bool,
        shared: bool,
        prefill_cells: int,
        setup_s: float,
        start: float,
    ) -> dict[str, Any]:
        stats = session.stats
        row: dict[str, Any] = {
            "task": task,
            "index": index,
            "method": session.method,
            "ratio": session.ratio,
            "budget": session.budget,
        }
        if task == "perplexity":
            from kvtrim.bench.perplexity import continuation_ids, continuation_nll

            ids = continuation_ids(self.tokenizer, sample)
            limit = _window(self.model)
            if session.context_length + len(ids) > limit:
                raise KVTrimError(
                    f"perplexity: context ({session.context_length}) + continuation ({len(ids)}) tokens "
                    f"exceed the model's window of {limit}; lower --length."
                )
            eval_start = time.perf_counter()
            nll, n_tokens = continuation_nll(session, ids)
            eval_s = time.perf_counter() - eval_start
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
            prefix, budget = self._answer_args(sample, chat)
            answer = session.answer(sample.question, max_new_tokens=budget, answer_prefix=prefix)
            eval_s = answer.answer_s
            row.update(
                prediction=answer.text,
                references=list(sample.references),
                metric=sample.metric,
                score=sample.score(answer.text),
                generated_tokens=len(answer.token_ids),
            )
        row.update(
            context_tokens=session.context_length,
            kv_tokens_before=stats.kv_tokens_before,
            kv_tokens_after=stats.kv_tokens_after,
            kv_bytes_before=stats.kv_bytes_before,
            kv_bytes_after=stats.kv_bytes_after,
            prefill_s=round(session.prefill_s, 5),
            score_s=round(stats.compress_s, 5),
            eval_s=round(eval_s, 5),
            cell_s=round(time.perf_counter() - start + setup_s, 5),
            shared_prefill=shared,
            prefill_cells=prefill_cells,
            seed=self.config.seed,
            length=self.config.length,
            model=self.config.model,
            metadata=_jsonable_metadata(sample.metadata),
            versions=self.versions,
        )
        return row


def _batches(
    plan: Sequence[tuple[str, int, Sample, list[Cell]]], batch_size: int
) -> Iterator[tuple[str, list[tuple[int, Sample]], list[Cell]]]:
    """Group consecutive samples of the same task with the same pending cells, up to batch_size."""
    group: list[tuple[int, Sample]] = []
    key: tuple[str, list[Cell]] | None = None
    for task, index, sample, pending in plan:
        if key is not None and (key != (task, pending) or len(group) == batch_size):
            yield key[0], group, key[1]
            group = []
        key = (task, pending)
        group.append((index, sample))
    if key is not None and group:
        yield key[0], group, key[1]


def _cell_chunks(cells: Sequence[Cell], size: int) -> list[list[Cell]]:
    """Cells in batches of at most ``size``, each drawn from as few (budget, ratio) groups as can be.

    The cells of one budget and ratio keep alike numbers of pairs, so their rows need little
    padding: each group is split into balanced chunks, and consecutive chunks are merged when they
    fit together (e.g. the single uncompressed cell joins a group).
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


class _Answered:
    """A session whose answer a cell batch already gave; its figures are the session's own."""

    def __init__(self, session: Any, answer: Any):
        self._session, self._answer = session, answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def answer(self, question: str, max_new_tokens: int, answer_prefix: str) -> Any:
        return self._answer


class _BatchElement:
    """One context of a :class:`~kvtrim.batch.BatchSession` seen as a session: its own figures,
    its share of the batch's prefill time, and the answer the batch already gave it."""

    def __init__(self, batch: Any, b: int, answer: Any):
        self.method, self.ratio, self.budget = batch.method, batch.ratio, batch.budget
        self.context_length = batch.context_lengths[b]
        self.stats = batch.element_stats(b)
        self.prefill_s = batch.prefill_s / len(batch)
        self._answer = replace(answer, answer_s=answer.answer_s / len(batch))

    def answer(self, question: str, max_new_tokens: int, answer_prefix: str) -> Any:
        return self._answer


def _window(model: Any) -> int:
    from kvtrim.models import max_context

    return max_context(model)


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
    """Run (or resume) the benchmark into ``out_dir``; see the module docstring.

    ``share=False`` gives every cell its own prefill (same rows, slower: the reference the shared
    path is checked against). ``samples`` replaces the generated ones (tests, custom data).
    ``batch_size=N`` answers up to N samples of a task together in one left-padded batch (same
    rows up to float rounding; cells a batch cannot hold run sample by sample). ``cell_batch=N``
    answers up to N cells of one sample together (:mod:`kvtrim.cell_batch`; same rows up to float
    rounding, 2-3x faster on a CPU: benchmarks/cell_batch_speed.py).
    """
    if batch_size < 1:
        raise KVTrimError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    results = out / RESULTS_FILE
    existing = read_results(results, repair=True)
    done = {row_key(r) for r in existing}
    if samples is None:
        samples = build_samples(config, tokenizer)
    plan = []
    skipped = 0
    # Rounds of batch_size samples over the tasks: an interrupted run covers every task evenly.
    rounds = max((len(items) for items in samples.values()), default=0)
    for first in range(0, rounds, batch_size):
        for task, items in samples.items():
            cells = config.task_cells(task)
            for index in range(first, min(first + batch_size, len(items))):
                pending = [c for c in cells if (task, index, *c) not in done]
                skipped += len(cells) - len(pending)
                if pending:
                    plan.append((task, index, items[index], pending))
    evaluator = CellEvaluator(model, tokenizer, config, share=share, cell_batch=cell_batch)
    writer = ResultsWriter(results)
    written = 0
    total = sum(len(p[3]) for p in plan)
    bar = tqdm(total=total, desc="kvtrim bench", unit="cell", file=sys.stderr, disable=not progress)
    try:
        for task, items, pending in _batches(plan, batch_size):
            first = items[0][0]
            label = f"{task} #{first}" if len(items) == 1 else f"{task} #{first}-{items[-1][0]}"
            bar.set_postfix_str(label, refresh=False)
            for row in evaluator.run_batch(task, items, pending):
                writer.write(row)
                existing.append(row)
                written += 1
                bar.update(1)
                if on_row is not None:
                    on_row(row)
    finally:
        bar.close()
        writer.close()
    return RunSummary(out, existing, written, skipped, time.perf_counter() - start)
