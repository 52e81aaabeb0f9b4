"""Plots of a benchmark folder: accuracy vs ratio (overall and per series), perplexity vs ratio,
and the needle heat map. Matplotlib's object API (``Figure``, Agg canvas), so making a report never
touches a global backend."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from matplotlib.figure import Figure

from kvtrim.bench.tables import (
    Column,
    Row,
    _accuracy_rows,
    _perplexity_rows,
    _tasks,
    average_by_cell,
    cell_label,
    cell_of,
    mean_scores,
    ordered_cells,
    perplexity_by_cell,
)


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _method_curve(values: dict[Column, float], method: str) -> tuple[list[float], list[float]]:
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


def accuracy_figures(rows: Sequence[Row]) -> list[tuple[str, Figure]]:
    """``(name, figure)``: ``accuracy_vs_ratio`` (average per series) and ``accuracy_vs_ratio_<series>``
    (one line per task, plus the average); a series is a method, or ``method+budget``."""
    acc = _accuracy_rows(rows)
    if not acc:
        return []
    methods = list(dict.fromkeys(m for m, _ in ordered_cells(acc) if m != "none"))
    avg = average_by_cell(acc)
    means = mean_scores(acc)
    fig = _figure()
    ax = fig.subplots()
    for method in methods or ["none"]:
        xs, ys = _method_curve(avg, method)
        ax.plot(xs, ys, marker="o", label=method, **_series_style(method, methods))
    _style_accuracy(ax, "Average score vs compression ratio")
    figures = [("accuracy_vs_ratio", fig)]
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
        figures.append((f"accuracy_vs_ratio_{_slug(method)}", fig))
    return figures


def plot_accuracy(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """The figures of :func:`accuracy_figures` as PNG files in ``out_dir``."""
    paths = []
    for name, fig in accuracy_figures(rows):
        paths.append(Path(out_dir) / f"{name}.png")
        fig.savefig(paths[-1])
    return paths


def accuracy_vs_kept_figure(points: dict[str, list[tuple[float, float]]]) -> Figure | None:
    """Average score against the share of the KV cache kept, one line per series."""
    if not points:
        return None
    fig = _figure()
    ax = fig.subplots()
    series = list(points)
    for name, pts in points.items():
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", label=name, **_series_style(name, series))
    ax.set_xlabel("KV cache kept (% of the uncompressed bytes)")
    ax.set_ylabel("score (0–100)")
    ax.set_ylim(-3, 103)
    ax.set_title("Average score vs memory kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return fig


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


def _needle_points(rows: Sequence[Row]) -> tuple[str, list[tuple[Column, int, float, float]]]:
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
    """:func:`needle_figure` as a PNG file, if there are needle rows."""
    fig = needle_figure(rows)
    if fig is None:
        return None
    fig.savefig(path)
    return Path(path)


def needle_figure(rows: Sequence[Row]) -> Figure | None:
    """Heat map of the needle found (mean score) by depth: cells × depth for one length, or one panel
    per cell (length × depth) when the grid has several lengths."""
    source, points = _needle_points(rows)
    if not points:
        return None
    cells = ordered_cells([{"method": c[0], "ratio": c[1]} for c, *_ in points])
    depths = sorted({d for _, _, d, _ in points})
    lengths = sorted({n for _, n, _, _ in points})
    groups: dict[tuple[Column, int, float], list[float]] = defaultdict(list)
    for cell, n, d, score in points:
        groups[(cell, n, d)].append(score)
    binned = source != "needle_grid"
    xlabels = [f"{100 * d:.0f}–{100 * (d + 0.2):.0f}%" if binned else f"{100 * d:.0f}%" for d in depths]

    def value(cell: Column, n: int, d: float) -> float:
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
    return fig
