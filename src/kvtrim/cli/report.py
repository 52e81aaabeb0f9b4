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
        "accuracy-vs-ratio plots (one per method) and a needle heat map (PNG). With two: compare them.",
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="a bench --out folder (two to compare)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument("--out", default=None, help="also write the comparison to this file")


def run(args: argparse.Namespace) -> int:
    from kvtrim.bench.report import compare_dirs, write_report

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
