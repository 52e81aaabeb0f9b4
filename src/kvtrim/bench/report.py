"""Reports of a benchmark folder: ``report.md`` with the tables and the plots, and the comparison of
two folders."""

from __future__ import annotations

from pathlib import Path

from kvtrim.bench.plots import plot_accuracy, plot_needle_grid, plot_perplexity
from kvtrim.bench.results import CONFIG_FILE, RESULTS_FILE, read_results
from kvtrim.bench.tables import Row, comparison_markdown, summary_markdown
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import write_atomic


def load_rows(out_dir: str | Path) -> list[Row]:
    """The rows of a bench folder (a truncated last line is ignored)."""
    folder = Path(out_dir)
    if not (folder / RESULTS_FILE).is_file():
        raise KVTrimError(f"{folder} has no {RESULTS_FILE}; run `kvtrim bench --out {folder}` first.")
    return read_results(folder / RESULTS_FILE)


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
    write_atomic(report, markdown.encode())
    return markdown, [report, *files]


def compare_dirs(dir_a: str | Path, dir_b: str | Path) -> str:
    a, b = Path(dir_a), Path(dir_b)
    return comparison_markdown(load_rows(a), load_rows(b), str(dir_a), str(dir_b))
