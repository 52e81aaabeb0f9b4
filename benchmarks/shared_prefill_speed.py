"""Wall time of a ``kvtrim bench`` sweep with one shared prefill per sample, against the same sweep
with every (method, ratio) cell prefilled on its own. Both sweeps must give identical rows.

Target: >= 3x faster for 3 methods x 2 ratios. Not a test: it prints figures measured in one run
(and saves them as JSON with --out).

    python benchmarks/shared_prefill_speed.py [--tasks niah_single_1,vt] [--samples 2] [--length 2048]
        [--methods knorm,expected-attention,qfilters] [--ratios 0.25,0.5] [--model M] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import kvtrim
from kvtrim.bench.config import BenchConfig, resolve_tasks
from kvtrim.bench.results import row_key
from kvtrim.bench.run import run_bench
from kvtrim.bench.samples import build_samples

COMPARED = ("prediction", "score", "kv_bytes_after", "kv_tokens_after")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="niah_single_1,vt")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--methods", default="knorm,expected-attention,qfilters")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on each task's answer budget")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    config = BenchConfig(
        tasks=resolve_tasks(args.tasks),
        methods=args.methods.split(","),
        ratios=[float(r) for r in args.ratios.split(",")],
        length=args.length,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        model=args.model or "embedded:SmolLM2-135M-Instruct",
    )
    model, tokenizer = kvtrim.load_model(args.model)
    samples = build_samples(config, tokenizer)
    n_samples = sum(len(v) for v in samples.values())
    n_cells = len(config.cells())
    # warm-up: first forward passes, calibration files and kernels are loaded outside the timings
    first = next(iter(samples.values()))[0]
    for method in config.methods:
        kvtrim.compress(model, tokenizer, first.context[:2000], method=method, ratio=0.5).ask("Hi?", 2)

    runs = {}
    for label, share in (("shared prefill", True), ("prefill per cell", False)):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = run_bench(model, tokenizer, config, out, share=share, progress=False, samples=samples)
            runs[label] = (time.perf_counter() - start, summary.rows)

    (shared_s, shared_rows), (alone_s, alone_rows) = runs.values()
    alone = {row_key(r): r for r in alone_rows}
    mismatches = sum(any(r[k] != alone[row_key(r)][k] for k in COMPARED) for r in shared_rows)
    print(
        f"{n_samples} samples ({args.tasks}, {args.length} tokens) x {n_cells} cells "
        f"({args.methods} x {args.ratios}) = {len(shared_rows)} rows"
    )
    header = f"{'sweep':<18} {'wall s':>8} {'prefills':>9} {'prefill s':>10} {'score s':>8} {'answer s':>9}"
    print(header)
    print("-" * len(header))
    for label, (wall, rows) in runs.items():
        shared = label == "shared prefill"
        # a shared prefill (and each method's scoring in it) is repeated on every row of its sample
        prefill = {(r["task"], r["index"]) if shared else row_key(r): r["prefill_s"] for r in rows}
        score = {(r["task"], r["index"], r["method"]) if shared else row_key(r): r["score_s"] for r in rows}
        answer = sum(r["eval_s"] for r in rows)
        print(
            f"{label:<18} {wall:>8.1f} {len(prefill):>9} {sum(prefill.values()):>10.1f} "
            f"{sum(score.values()):>8.1f} {answer:>9.1f}"
        )
    print(f"speed-up: {alone_s / shared_s:.2f}x (target >= 3x); rows that differ: {mismatches}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(
                dict(
                    tasks=args.tasks,
                    samples=n_samples,
                    length=args.length,
                    methods=args.methods,
                    ratios=args.ratios,
                    shared_s=shared_s,
                    per_cell_s=alone_s,
                    speedup=alone_s / shared_s,
                    rows_differing=mismatches,
                ),
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
