"""Prefill time, scoring time per method (as a fraction of prefill) and KV bytes after
compression against (1 − ratio) × full, on the embedded model at 2k and 4k tokens.

Targets: scoring ≤ 5% of prefill; bytes after within 2% of (1 − ratio) × full.
Not a test: it prints figures measured in one run (and saves them as JSON with --out).

    python benchmarks/core_speed_memory.py [--lengths 2048,4096] [--ratio 0.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics

import kvtrim
from kvtrim.bench.tasks.needle import needle_sample

METHODS = ("none", "knorm", "expected-attention", "qfilters", "streaming-llm", "random")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the median is kept")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    model, tokenizer = kvtrim.load_model(args.model)
    rows = []
    header = (
        f"{'tokens':>6} {'method':<19} {'prefill s':>9} {'score s':>8} {'score/prefill':>13} "
        f"{'KV MiB full':>11} {'KV MiB kept':>11} {'kept/(1-r)full':>14}"
    )
    print(header)
    print("-" * len(header))
    for length in (int(x) for x in args.lengths.split(",")):
        sample = needle_sample(tokenizer, length, depth=0.5)
        for method in METHODS:
            runs = [
                kvtrim.compress(model, tokenizer, sample.context, method=method, ratio=args.ratio)
                for _ in range(args.repeats)
            ]
            prefill = statistics.median(r.prefill_s for r in runs)
            score = statistics.median(r.stats.compress_s for r in runs)
            stats = runs[-1].stats
            target = stats.kv_bytes_before * (1 - args.ratio) if method != "none" else stats.kv_bytes_before
            row = dict(
                tokens=runs[-1].context_length,
                method=method,
                ratio=args.ratio,
                prefill_s=prefill,
                score_s=score,
                score_fraction=score / prefill,
                kv_bytes_full=stats.kv_bytes_before,
                kv_bytes_kept=stats.kv_bytes_after,
                kept_vs_target=stats.kv_bytes_after / target,
            )
            rows.append(row)
            mib = 1024 * 1024
            print(
                f"{row['tokens']:>6} {method:<19} {prefill:>9.2f} {score:>8.3f} "
                f"{row['score_fraction']:>13.1%} "
                f"{stats.kv_bytes_before / mib:>11.2f} {stats.kv_bytes_after / mib:>11.2f} "
                f"{row['kept_vs_target']:>14.4f}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
