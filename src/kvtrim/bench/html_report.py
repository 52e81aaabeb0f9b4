"""``kvtrim report DIR... --html``: one self-contained leaderboard page of one or several runs.

The page needs no network: its styles and its small sorting script are inline, and the plots are
inline SVG drawn with matplotlib. It holds the leaderboard (task × method × budget × ratio, with
each run's macro average over tasks as task ``average``, the share of the KV cache kept and the
time per cell), accuracy-vs-ratio plots (all series, then one per series with its tasks),
accuracy-vs-memory-kept, the needle heat map, every row of the runs, and each run's configuration.
Rows come from bench folders (``results.jsonl``) or from a CSV export with at least the columns
task, method, budget, ratio, score (``docs/ruler_2k_sweep.csv``).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from statistics import fmean
from typing import Any

from jinja2 import Environment, select_autoescape

from kvtrim.bench.plots import accuracy_figures, accuracy_vs_kept_figure, needle_figure
from kvtrim.bench.results import CONFIG_FILE
from kvtrim.bench.tables import Row, _accuracy_rows
from kvtrim.core.errors import KVTrimError
from kvtrim.core.version import __version__

TEMPLATE = "report.html.j2"
_CSV_NUMBERS = {"ratio": float, "score": float, "kept": float, "index": int}


def rows_of(source: str | Path) -> tuple[list[Row], dict[str, Any] | None]:
    """The rows of a bench folder or a CSV export, and the folder's configuration if it has one."""
    from kvtrim.bench.report import load_rows

    path = Path(source)
    if path.is_file() and path.suffix == ".csv":
        return _csv_rows(path), None
    rows = load_rows(path)
    config = path / CONFIG_FILE
    return rows, (json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None)


def _csv_rows(path: Path) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"task", "method", "ratio", "score"} - set(reader.fieldnames or ())
        if missing:
            raise KVTrimError(f"{path} lacks the column(s) {', '.join(sorted(missing))}.")
        rows = []
        for line in reader:
            row: dict[str, Any] = dict(line)
            for key, kind in _CSV_NUMBERS.items():
                if row.get(key) not in (None, ""):
                    row[key] = kind(row[key])
            row.setdefault("budget", "uniform")
            rows.append(row)
    return rows


def kept_share(row: Row) -> float | None:
    """The fraction of the KV cache a row kept: its ``kept`` column, else its bytes."""
    if row.get("kept") not in (None, ""):
        return float(row["kept"])
    before, after = row.get("kv_bytes_before"), row.get("kv_bytes_after")
    return after / before if before else None


def cell_seconds(row: Row) -> float | None:
    parts = [row.get(k) for k in ("prefill_s", "score_s", "eval_s")]
    return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None


def leaderboard(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One line per (task, method, budget, ratio) with its mean score, plus task ``average`` lines
    (the macro average over tasks, RULER's way: each task counts once)."""
    groups: dict[tuple[str, str, str, float], list[Row]] = defaultdict(list)
    for row in _accuracy_rows(rows):
        budget = "uniform" if row["method"] == "none" else str(row.get("budget") or "uniform")
        groups[(str(row["task"]), str(row["method"]), budget, float(row["ratio"]))].append(row)
    lines = [
        _line(task, method, budget, ratio, members)
        for (task, method, budget, ratio), members in groups.items()
    ]
    by_cell: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_cell[(line["method"], line["budget"], line["ratio"])].append(line)
    for (method, budget, ratio), members in by_cell.items():
        lines.append(
            {
                "task": "average",
                "method": method,
                "budget": budget,
                "ratio": ratio,
                "score": fmean(m["score"] for m in members),
                "n": sum(m["n"] for m in members),
                "kept_pct": _mean([m["kept_pct"] for m in members]),
                "cell_s": _mean([m["cell_s"] for m in members]),
            }
        )
    return sorted(lines, key=lambda x: (x["task"] != "average", x["task"], -x["score"]))


def _line(task: str, method: str, budget: str, ratio: float, members: list[Row]) -> dict[str, Any]:
    kept = _mean([kept_share(r) for r in members])
    return {
        "task": task,
        "method": method,
        "budget": budget,
        "ratio": ratio,
        "score": fmean(float(r["score"]) for r in members),
        "n": len(members),
        "kept_pct": None if kept is None else 100 * kept,
        "cell_s": _mean([cell_seconds(r) for r in members]),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})  # the same rows give the same page
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prologue: the SVG sits inside HTML


def _kept_points(lines: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in lines:
        if line["task"] == "average" and line["kept_pct"] is not None:
            series = line["method"] if line["budget"] == "uniform" else f"{line['method']}+{line['budget']}"
            points[series].append((line["kept_pct"], line["score"]))
    none = points.pop("none", None)
    if none:
        for series in points.values():
            series.extend(none)
    return dict(points)


def render_html(sources: Sequence[str | Path], title: str | None = None) -> str:
    """The page for the rows of ``sources`` (bench folders or CSV files), merged."""
    rows: list[Row] = []
    configs: list[tuple[str, str]] = []
    for source in sources:
        found, config = rows_of(source)
        rows += found
        configs.append(
            (str(source), json.dumps(config, indent=1) if config else "(no config.json: a CSV export)")
        )
    if not rows:
        raise KVTrimError("No rows to report.")
    lines = leaderboard(rows)
    plots = [(name, _svg(fig)) for name, fig in accuracy_figures(rows)]
    kept = accuracy_vs_kept_figure(_kept_points(lines))
    if kept is not None:
        plots.insert(1, ("accuracy_vs_kept", _svg(kept)))
    needle = needle_figure(rows)
    if needle is not None:
        plots.append(("needle_grid", _svg(needle)))
    environment = Environment(autoescape=select_autoescape(default=True))
    template = environment.from_string(
        (resources.files("kvtrim") / "data" / TEMPLATE).read_text(encoding="utf-8")
    )
    return template.render(
        title=title or "kvtrim leaderboard — " + ", ".join(Path(s).name for s in sources),
        version=__version__,
        lines=lines,
        rows=rows,
        plots=plots,
        configs=configs,
        kept_share=kept_share,
    )
