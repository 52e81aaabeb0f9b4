"""``kvtrim report``: tables and plots of a bench folder, or the comparison of two."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import write_atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="tables and plots of a bench folder, or the comparison of two",
        description="With one folder: print the markdown tables and write DIR/report.md, "
        "accuracy-vs-ratio plots (one per method) and a needle heat map (PNG). With two: compare them. "
        "With --html: one self-contained leaderboard page of the merged rows of every folder given "
        "(or CSV export: task, method, budget, ratio, score[, kept]).",
    )
    report.add_argument(
        "dirs", nargs="+", metavar="DIR", help="a bench --out folder (two to compare; any number with --html)"
    )
    report.add_argument(
        "--html",
        action="store_true",
        help="write a leaderboard page (sortable table, plots, heat map, configuration; no network "
        "needed to view it) to --out, default DIR/report.html (report.html here for several)",
    )
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument(
        "--out", default=None, help="also write the comparison to this file (with --html: the page)"
    )


def run(args: argparse.Namespace) -> int:
    from kvtrim.bench.report import compare_dirs, write_report

    if args.html:
        return _html(args)
    if len(args.dirs) > 2:
        raise KVTrimError("Give one bench folder (report) or two (comparison).")
    if len(args.dirs) == 2:
        text = compare_dirs(*args.dirs)
        print(text)
        if args.out:
            write_atomic(Path(args.out), text.encode())
        return 0
    markdown, files = write_report(args.dirs[0], plots=not args.no_plots)
    print(markdown)
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def _html(args: argparse.Namespace) -> int:
    from kvtrim.bench.html_report import render_html

    for source in args.dirs:
        if not Path(source).exists():
            raise KVTrimError(f"{source} does not exist: give bench folders or CSV exports.")
    page = render_html(args.dirs)
    single = len(args.dirs) == 1 and Path(args.dirs[0]).is_dir()
    out = (
        Path(args.out)
        if args.out
        else (Path(args.dirs[0]) / "report.html" if single else Path("report.html"))
    )
    write_atomic(out, page.encode())
    print(f"wrote {out} ({len(page) // 1024} KiB)", file=sys.stderr)
    return 0
