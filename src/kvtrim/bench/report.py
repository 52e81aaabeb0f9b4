"""Reports of a benchmark folder: markdown tables, accuracy-vs-ratio plots, a needle heat map, and the
comparison of two folders.

A cell is (series, ratio), where the series is the method, labelled ``method+budget`` when the row's
budget is not uniform (``snapkv+adaptive``): each (method, budget) pair is one column group and one
curve, and tables keep one header row. Rows without a budget field (older folders) are uniform.
The ``("none", 0.0)`` cell (nothing evicted) is drawn as every series' ratio-0 point and shown as
its own ``none`` column. Plots use matplotlib's object API (``Figure``, Agg canvas), so making a
report never touches a global backend.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from kvtrim.bench.runner import CONFIG_FILE, RESULTS_FILE, read_results
from kvtrim.errors import KVTrimError

Row = dict[str, Any]
Cell = tuple[str, float]
AVERAGE = "**average**"


def load_rows(out_dir: str | Path) -> list[Row]:
    """The rows of a bench folder (a truncated last line is ignored)."""
    folder = Path(out_dir)
    if not (folder / RESULTS_FILE).is_file():
        raise KVTrimError(f"{folder} has no {RESULTS_FILE}; run `kvtrim bench --out {folder}` first.")
    return read_results(folder / RESULTS_FILE)


def series_of(row: Row) -> str:
    """The method, with its budget when not uniform: ``knorm``, ``knorm+adaptive``."""
    method, budget = str(row["method"]), str(row.get("budget") or "uniform")
    return method if budget == "uniform" or method == "none" else f"{method}+{budget}"


def cell_of(row: Row) -> Cell:
    return series_of(row), float(row["ratio"])


def cell_label(cell: Cell) -> str:
    return "none" if cell[0] == "none" else f"{cell[0]} {cell[1]:g}"


def ordered_cells(rows: Iterable[Row]) -> list[Cell]:
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


def mean_scores(rows: Iterable[Row]) -> dict[tuple[str, Cell], float]:
    """Mean score per (task, cell)."""
    groups: dict[tuple[str, Cell], list[float]] = defaultdict(list)
    for row in _accuracy_rows(rows):
        groups[(str(row["task"]), cell_of(row))].append(float(row["score"]))
    return {k: fmean(v) for k, v in groups.items()}


def average_by_cell(rows: Sequence[Row]) -> dict[Cell, float]:
    """Macro average over tasks (RULER's average): each task counts once, whatever its size."""
    means = mean_scores(rows)
    out: dict[Cell, list[float]] = defaultdict(list)
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


def perplexity_by_cell(rows: Sequence[Row]) -> dict[Cell, float]:
    """exp(total NLL / total tokens) per cell, over every perplexity sample."""
    nll: dict[Cell, float] = defaultdict(float)
    tokens: dict[Cell, int] = defaultdict(int)
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


# --- plots -------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _method_curve(values: dict[Cell, float], method: str) -> tuple[list[float], list[float]]:
    """(ratios, values) of one method, starting from the ``none`` cell at ratio 0 when present."""
    points = {r: v for (m, r), v in values.items() if m == method}
    if ("none", 0.0) in values and 0.0 not in points:
        points[0.0] = values[("none", 0.0)]
    xs = sorted(points)
    return xs, [points[x] for x in xs]


_BUDGET_LINES = {"adaptive": "--", "pyramid": ":"}


def _series_style(series: str, all_series: Sequence[str]) -> dict[str, Any]:
    """One colour per method, one line style per budget: a method's budgets read as a family."""
    methods = list(dict.fromkeys(s.split("+")[0] for s in all_series))
    method, _, budget = series.partition("+")
    color = f"C{methods.index(method) % 10}" if method in methods else None
    return {"color": color, "linestyle": _BUDGET_LINES.get(budget, "-.") if budget else "-"}


def plot_accuracy(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """``accuracy_vs_ratio.png`` (average per series) and ``accuracy_vs_ratio_<series>.png`` (one line
    per task, plus the average); a series is a method, or ``method+budget`` for other budgets."""
    acc = _accuracy_rows(rows)
    if not acc:
        return []
    out = Path(out_dir)
    methods = [m for m, _ in ordered_cells(acc) if m != "none"]
    methods = list(dict.fromkeys(methods))
    avg = average_by_cell(acc)
    means = mean_scores(acc)
    paths = []
    fig = _figure()
    ax = fig.subplots()
    for method in methods or ["none"]:
        xs, ys = _method_curve(avg, method)
        ax.plot(xs, ys, marker="o", label=method, **_series_style(method, methods))
    _style_accuracy(ax, "Average score vs compression ratio")
    paths.append(out / "accuracy_vs_ratio.png")
    fig.savefig(paths[-1])
    for method in methods:
        fig = _figure()
        ax = fig.subplots()
        for task in _tasks(acc):
            per_task = {c: v for (t, c), v in means.items() if t == task}
            xs, ys = _method_curve(per_task, method)
            if xs:
                ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.7, label=task)
        xs, ys = _method_curve(avg, method)
        ax.plot(xs, ys, color="black", linewidth=2.5, marker="o", label="average")
        _style_accuracy(ax, f"{method}: score vs compression ratio")
        paths.append(out / f"accuracy_vs_ratio_{_slug(method)}.png")
        fig.savefig(paths[-1])
    return paths


def _style_accuracy(ax: Any, title: str) -> None:
    ax.set_xlabel("compression ratio (fraction of the KV cache evicted)")
    ax.set_ylabel("score (0–100)")
    ax.set_ylim(-3, 103)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)


def plot_perplexity(rows: Sequence[Row], path: str | Path) -> Path | None:
    ppl = perplexity_by_cell(rows)
    if not ppl:
        return None
    fig = _figure()
    ax = fig.subplots()
    methods = list(dict.fromkeys(m for m, _ in ordered_cells(_perplexity_rows(rows)) if m != "none"))
    for method in methods or ["none"]:
        xs, ys = _method_curve(ppl, method)
        ax.plot(xs, ys, marker="o", label=method, **_series_style(method, methods))
    ax.set_xlabel("compression ratio (fraction of the KV cache evicted)")
    ax.set_ylabel("perplexity of the continuation")
    ax.set_title("Perplexity vs compression ratio (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


def _needle_points(rows: Sequence[Row]) -> tuple[str, list[tuple[Cell, int, float, float]]]:
    """(source, [(cell, length, depth, score)]): needle_grid rows, else single-needle RULER rows."""
    grid = [r for r in _accuracy_rows(rows) if r["task"] == "needle_grid"]
    if grid:
        return "needle_grid", [
            (cell_of(r), int(r["metadata"]["length"]), float(r["metadata"]["target_depth"]), r["score"])
            for r in grid
        ]
    single = [
        r
        for r in _accuracy_rows(rows)
        if str(r["task"]).startswith("niah_single") and isinstance(r.get("metadata", {}).get("depth"), float)
    ]
    bins = 5  # 0–20 %, …, 80–100 % of the haystack
    points = [
        (
            cell_of(r),
            int(r["metadata"].get("length") or r["length"]),
            min(int(r["metadata"]["depth"] * bins), bins - 1) / bins,
            r["score"],
        )
        for r in single
    ]
    return "niah_single_*", points


def plot_needle_grid(rows: Sequence[Row], path: str | Path) -> Path | None:
    """Heat map of the needle found (mean score) by depth: cells × depth for one length, or one panel
    per cell (length × depth) when the grid has several lengths."""
    source, points = _needle_points(rows)
    if not points:
        return None
    cells = ordered_cells([{"method": c[0], "ratio": c[1]} for c, *_ in points])
    depths = sorted({d for _, _, d, _ in points})
    lengths = sorted({n for _, n, _, _ in points})
    groups: dict[tuple[Cell, int, float], list[float]] = defaultdict(list)
    for cell, n, d, score in points:
        groups[(cell, n, d)].append(score)
    binned = source != "needle_grid"
    xlabels = [f"{100 * d:.0f}–{100 * (d + 0.2):.0f}%" if binned else f"{100 * d:.0f}%" for d in depths]

    def value(cell: Cell, n: int, d: float) -> float:
        scores = groups.get((cell, n, d))
        return fmean(scores) if scores else math.nan

    panels = [
        (None, [[value(c, lengths[0], d) for d in depths] for c in cells], [cell_label(c) for c in cells])
    ]
    if len(lengths) > 1:
        panels = [
            (c, [[value(c, n, d) for d in depths] for n in lengths], [str(n) for n in lengths]) for c in cells
        ]
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _figure(
        max(6.4, cols * (0.7 * len(depths) + 1.5) + 1), max(3.0, 0.45 * len(panels[0][2]) * nrows + 1.8)
    )
    axes = fig.subplots(nrows, cols, squeeze=False)
    image = None
    for ax, (cell, matrix, ylabels) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), xlabels, fontsize="small", rotation=45 if binned else 0)
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize="small")
        ax.set_xlabel("needle depth")
        if cell is not None:
            ax.set_title(cell_label(cell), fontsize="medium")
            ax.set_ylabel("context tokens")
        for i, line in enumerate(matrix):
            for j, v in enumerate(line):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize="x-small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"Needle found (%) by depth — {source}, length {', '.join(map(str, lengths))}")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    fig.savefig(path)
    return Path(path)


# --- entry points ------------------------------------------------------------------------------


def write_report(out_dir: str | Path, plots: bool = True) -> tuple[str, list[Path]]:
    """Write ``report.md`` (and the PNGs) into a bench folder; returns (markdown, files)."""
    folder = Path(out_dir)
    rows = load_rows(folder)
    if not rows:
        raise KVTrimError(f"{folder / RESULTS_FILE} holds no row yet.")
    title = f"kvtrim bench — {folder.name}"
    config = folder / CONFIG_FILE
    markdown = summary_markdown(rows, title)
    if config.is_file():
        markdown += f"\nConfiguration: `{CONFIG_FILE}`; {len(rows)} rows in `{RESULTS_FILE}`.\n"
    files: list[Path] = []
    if plots:
        files += plot_accuracy(rows, folder)
        for made in (
            plot_needle_grid(rows, folder / "needle_grid.png"),
            plot_perplexity(rows, folder / "perplexity_vs_ratio.png"),
        ):
            if made is not None:
                files.append(made)
        if files:
            markdown += "\n## Plots\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in files) + "\n"
    report = folder / "report.md"
    report.write_text(markdown, encoding="utf-8")
    return markdown, [report, *files]


def compare_dirs(dir_a: str | Path, dir_b: str | Path) -> str:
    a, b = Path(dir_a), Path(dir_b)
    return comparison_markdown(load_rows(a), load_rows(b), str(dir_a), str(dir_b))
