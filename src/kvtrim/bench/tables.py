"""The tables of benchmark rows: scores by task and cell, perplexity, memory and time, and the
comparison of two sets of rows.

A cell is (series, ratio), where the series is the method, labelled ``method+budget`` when the row's
budget is not uniform (``snapkv+adaptive``): each (method, budget) pair is one column group and one
curve, and tables keep one header row. Rows without a budget field (older folders) are uniform.
The ``("none", 0.0)`` cell (nothing evicted) is drawn as every series' ratio-0 point and shown as
its own ``none`` column. Plots use matplotlib's object API (``Figure``, Agg canvas), so making a
report never touches a global backend.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import fmean
from typing import Any

from kvtrim.core.errors import KVTrimError

Row = dict[str, Any]
#: (series, ratio): one column of the tables and one point of a curve (a series is a method, or
#: ``method+budget`` for other budgets)
Column = tuple[str, float]
AVERAGE = "**average**"


def series_of(row: Row) -> str:
    """The method, with its budget when not uniform: ``knorm``, ``knorm+adaptive``."""
    method, budget = str(row["method"]), str(row.get("budget") or "uniform")
    return method if budget == "uniform" or method == "none" else f"{method}+{budget}"


def cell_of(row: Row) -> Column:
    return series_of(row), float(row["ratio"])


def cell_label(cell: Column) -> str:
    return "none" if cell[0] == "none" else f"{cell[0]} {cell[1]:g}"


def ordered_cells(rows: Iterable[Row]) -> list[Column]:
    """``none`` first, then methods in order of appearance, ratios ascending."""
    cells = list(dict.fromkeys(cell_of(r) for r in rows))
    methods = list(dict.fromkeys(m for m, _ in cells))
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(cells, key=lambda c: (c[0] != "none", rank[c[0]], c[1]))


def _accuracy_rows(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("score") is not None]


def _perplexity_rows(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("nll") is not None]


def _tasks(rows: Iterable[Row]) -> list[str]:
    return list(dict.fromkeys(str(r["task"]) for r in rows))


def mean_scores(rows: Iterable[Row]) -> dict[tuple[str, Column], float]:
    """Mean score per (task, cell)."""
    groups: dict[tuple[str, Column], list[float]] = defaultdict(list)
    for row in _accuracy_rows(rows):
        groups[(str(row["task"]), cell_of(row))].append(float(row["score"]))
    return {k: fmean(v) for k, v in groups.items()}


def average_by_cell(rows: Sequence[Row]) -> dict[Column, float]:
    """Macro average over tasks (RULER's average): each task counts once, whatever its size."""
    means = mean_scores(rows)
    out: dict[Column, list[float]] = defaultdict(list)
    for (_, cell), value in means.items():
        out[cell].append(value)
    return {cell: fmean(v) for cell, v in out.items()}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def accuracy_table(rows: Sequence[Row]) -> str:
    """Tasks × cells, mean score in [0, 100], with the average row (macro over tasks)."""
    acc = _accuracy_rows(rows)
    if not acc:
        return ""
    cells = ordered_cells(acc)
    means = mean_scores(acc)
    counts = {t: len({int(r["index"]) for r in acc if r["task"] == t}) for t in _tasks(acc)}
    body = [[t, str(counts[t]), *[_fmt(means.get((t, c))) for c in cells]] for t in _tasks(acc)]
    avg = average_by_cell(acc)
    body.append([AVERAGE, "", *[_fmt(avg.get(c)) for c in cells]])
    return _table(["task", "n", *[cell_label(c) for c in cells]], body, numeric_from=1)


def perplexity_by_cell(rows: Sequence[Row]) -> dict[Column, float]:
    """exp(total NLL / total tokens) per cell, over every perplexity sample."""
    nll: dict[Column, float] = defaultdict(float)
    tokens: dict[Column, int] = defaultdict(int)
    for row in _perplexity_rows(rows):
        nll[cell_of(row)] += float(row["nll"])
        tokens[cell_of(row)] += int(row["n_tokens"])
    return {c: math.exp(nll[c] / tokens[c]) for c in nll if tokens[c]}


def perplexity_table(rows: Sequence[Row]) -> str:
    ppl = perplexity_by_cell(rows)
    if not ppl:
        return ""
    cells = ordered_cells(_perplexity_rows(rows))
    n = len({int(r["index"]) for r in _perplexity_rows(rows)})
    return _table(
        ["task", "n", *[cell_label(c) for c in cells]],
        [["perplexity ↓", str(n), *[_fmt(ppl.get(c), 2) for c in cells]]],
    )


def cost_table(rows: Sequence[Row]) -> str:
    """Per cell: KV kept, mean KV MiB after compression, and mean timings (seconds)."""
    if not rows:
        return ""
    cells = ordered_cells(rows)
    mib = 1024 * 1024
    body = []
    for cell in cells:
        mine = [r for r in rows if cell_of(r) == cell]
        before = sum(r["kv_bytes_before"] for r in mine)
        after = sum(r["kv_bytes_after"] for r in mine)
        body.append(
            [
                cell_label(cell),
                str(len(mine)),
                _fmt(100 * after / before if before else None),
                _fmt(fmean(r["kv_bytes_after"] for r in mine) / mib, 2),
                _fmt(fmean(r["prefill_s"] for r in mine), 3),
                _fmt(fmean(r["score_s"] for r in mine), 3),
                _fmt(fmean(r["eval_s"] for r in mine), 3),
                _fmt(fmean(r["cell_s"] for r in mine), 3),
            ]
        )
    header = ["cell", "rows", "KV kept %", "KV MiB", "prefill s", "score s", "answer/NLL s", "cell s"]
    return _table(header, body)


def summary_markdown(rows: Sequence[Row], title: str = "kvtrim bench") -> str:
    """The tables of a run (what ``kvtrim bench`` prints at the end and ``report.md`` starts with)."""
    parts = [f"# {title}", ""]
    acc = accuracy_table(rows)
    if acc:
        parts += ["## Score (0–100) by task", "", acc, ""]
    ppl = perplexity_table(rows)
    if ppl:
        parts += ["## Perplexity of the continuation after the compressed context", "", ppl, ""]
    cost = cost_table(rows)
    if cost:
        parts += ["## Memory and time per cell (means)", "", cost, ""]
    return "\n".join(parts).rstrip() + "\n"


# --- comparison --------------------------------------------------------------------------------


def comparison_markdown(rows_a: Sequence[Row], rows_b: Sequence[Row], label_a: str, label_b: str) -> str:
    """Scores of two folders side by side, on the (task, sample, method, ratio, budget) rows both hold:
    ``A → B (Δ)`` per task and cell, the average row, and how many predictions changed."""

    def keyed(rows: Sequence[Row]) -> dict[tuple, Row]:
        return {(r["task"], int(r["index"]), *cell_of(r)): r for r in rows}

    a, b = keyed(rows_a), keyed(rows_b)
    common = [k for k in a if k in b]
    if not common:
        raise KVTrimError(f"{label_a} and {label_b} share no (task, sample, method, ratio) row to compare.")
    shared_a = [a[k] for k in common]
    shared_b = [b[k] for k in common]
    lines = [f"# {label_a} → {label_b}", "", f"{len(common)} rows in common "]
    lines[-1] += f"({len(a) - len(common)} only in {label_a}, {len(b) - len(common)} only in {label_b})."
    acc_a, acc_b = _accuracy_rows(shared_a), _accuracy_rows(shared_b)
    if acc_a:
        cells = ordered_cells(acc_a)
        ma, mb = mean_scores(acc_a), mean_scores(acc_b)

        def cmp(x: float | None, y: float | None) -> str:
            if x is None or y is None:
                return "–"
            return f"{x:.1f} → {y:.1f} ({y - x:+.1f})"

        body = [[t, *[cmp(ma.get((t, c)), mb.get((t, c))) for c in cells]] for t in _tasks(acc_a)]
        aa, ab = average_by_cell(acc_a), average_by_cell(acc_b)
        body.append([AVERAGE, *[cmp(aa.get(c), ab.get(c)) for c in cells]])
        changed = sum(a[k].get("prediction") != b[k].get("prediction") for k in common)
        lines += ["", "## Score (0–100)", "", _table(["task", *[cell_label(c) for c in cells]], body)]
        lines += ["", f"Predictions that differ: {changed} of {len(acc_a)}."]
    pa, pb = perplexity_by_cell(shared_a), perplexity_by_cell(shared_b)
    if pa:
        cells = ordered_cells(_perplexity_rows(shared_a))
        body = [[f"perplexity ({label_a} → {label_b})", *[f"{pa[c]:.2f} → {pb[c]:.2f}" for c in cells]]]
        lines += ["", "## Perplexity", "", _table(["", *[cell_label(c) for c in cells]], body)]
    return "\n".join(lines) + "\n"
