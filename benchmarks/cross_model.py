"""Which configurations hold ≥ 95% of the uncompressed accuracy, at which ratio, on both models?

Reads per-sample RULER rows of the two named models — a CSV with the columns of
``docs/ruler_2k_sweep.csv`` (task, index, method, budget, ratio, score, kept) or bench folders
(their ``results.jsonl``) — restricted to each model's tasks, and prints one Markdown table:
per configuration (method + budget) and ratio, each model's average as a share of its own
uncompressed average, and the worse of the two. Not a test: it prints what the rows say.

    python benchmarks/cross_model.py --smollm2 docs/ruler_2k_sweep.csv \
        --gemma docs/ruler_2k_gemma.csv [--threshold 95]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

SMOLLM2_TASKS = ("niah_single_1", "niah_single_2", "niah_multivalue", "niah_multiquery", "fwe")
GEMMA_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue")

Key = tuple[str, float]  # (configuration, ratio)


def read_rows(sources: list[str]) -> list[dict]:
    rows: list[dict] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for line in (path / "results.jsonl").read_text().splitlines():
                row = json.loads(line)
                rows.append({k: row[k] for k in ("task", "index", "method", "budget", "ratio", "score")})
        else:
            rows.extend(csv.DictReader(path.open()))
    return rows


def shares(rows: list[dict], tasks: tuple[str, ...]) -> dict[Key, float]:
    """(configuration, ratio) -> average over ``tasks`` as a % of the uncompressed average."""
    by_cell: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["task"] not in tasks:
            continue
        ratio = float(row["ratio"])
        name = "none" if row["method"] == "none" or ratio == 0 else row["method"]
        label = name if row["budget"] in ("uniform", "") or name == "none" else f"{name}+{row['budget']}"
        by_cell[(label, 0.0 if name == "none" else ratio)][row["task"]].append(float(row["score"]))
    averages = {
        key: sum(sum(v) / len(v) for v in per_task.values()) / len(tasks)
        for key, per_task in by_cell.items()
        if set(per_task) == set(tasks)
    }
    full = averages[("none", 0.0)]
    return {key: 100 * avg / full for key, avg in averages.items() if key[0] != "none"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smollm2", nargs="+", required=True)
    parser.add_argument("--gemma", nargs="+", required=True)
    parser.add_argument("--threshold", type=float, default=95.0)
    args = parser.parse_args()
    smol, gemma = shares(read_rows(args.smollm2), SMOLLM2_TASKS), shares(read_rows(args.gemma), GEMMA_TASKS)
    both = sorted(set(smol) & set(gemma), key=lambda k: (k[1], -min(smol[k], gemma[k])))
    print("| configuration | ratio | SmolLM2 % of none | Gemma 3 % of none | worse of the two |")
    print("|---|---:|---:|---:|---:|")
    for key in both:
        worse = min(smol[key], gemma[key])
        mark = "**" if worse >= args.threshold else ""
        print(f"| {key[0]} | {key[1]} | {smol[key]:.1f} | {gemma[key]:.1f} | {mark}{worse:.1f}{mark} |")
    for ratio in sorted({k[1] for k in both}):
        held = [k[0] for k in both if k[1] == ratio and min(smol[k], gemma[k]) >= args.threshold]
        print(f"\nratio {ratio}: ≥ {args.threshold:g}% on both: {', '.join(held) or 'none'}")


if __name__ == "__main__":
    main()
