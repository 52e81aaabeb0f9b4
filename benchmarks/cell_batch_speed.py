"""Wall time of a ``kvtrim bench`` sweep answering each sample's cells one by one, against the same
sweep answering them in cell batches (``--cell-batch N``). Both share one prefill per sample; the
rows must agree (predictions, scores, kept pairs), up to the rare greedy tie that float rounding
of batched kernels can flip — any such row is counted and printed.

Not a test: it prints figures measured in one run (and saves them as JSON with --out).

    python benchmarks/cell_batch_speed.py [--tasks niah_single_1,niah_multiquery] [--samples 1]
        [--methods knorm,...] [--ratios 0.25,0.5,0.75] [--budgets uniform,adaptive] [--cell-batch 18]
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
METHODS = "knorm,expected-attention,qfilters,streaming-llm,snapkv,tova,keydiff,random"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="niah_single_1,niah_multiquery")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--budgets", default="uniform,adaptive")
    parser.add_argument("--cell-batch", type=int, default=18)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    config = BenchConfig(
        tasks=resolve_tasks(args.tasks),
        methods=args.methods.split(","),
        ratios=[float(r) for r in args.ratios.split(",")],
        budgets=args.budgets.split(","),
        length=args.length,
        samples=args.samples,
        model=args.model or "embedded:SmolLM2-135M-Instruct",
    )
    model, tokenizer = kvtrim.load_model(args.model)
    samples = build_samples(config, tokenizer)
    # warm-up: first forward passes and calibration files are loaded outside the timings
    first = next(iter(samples.values()))[0]
    for method in config.methods:
        kvtrim.compress(model, tokenizer, first.context[:2000], method=method, ratio=0.5).ask("Hi?", 2)

    runs = {}
    for label, batch in (("one by one", 1), (f"cell batch {args.cell_batch}", args.cell_batch)):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = run_bench(
                model, tokenizer, config, out, progress=False, samples=samples, cell_batch=batch
            )
            runs[label] = (time.perf_counter() - start, summary.rows)

    (alone_s, alone_rows), (batch_s, batch_rows) = runs.values()
    alone = {row_key(r): r for r in alone_rows}
    differing = [r for r in batch_rows if any(r[k] != alone[row_key(r)][k] for k in COMPARED)]
    print(
        f"{sum(len(v) for v in samples.values())} samples ({args.tasks}, {args.length} tokens) x "
        f"{len(config.cells())} cells = {len(batch_rows)} rows"
    )
    header = f"{'answering':<16} {'wall s':>8} {'answer s':>9} {'tokens':>7}"
    print(header)
    print("-" * len(header))
    for label, (wall, rows) in runs.items():
        answer = sum(r["eval_s"] for r in rows)
        tokens = sum(r.get("generated_tokens", 0) for r in rows)
        print(f"{label:<16} {wall:>8.1f} {answer:>9.1f} {tokens:>7}")
    print(f"speed-up: {alone_s / batch_s:.2f}x wall; rows that differ: {len(differing)}")
    for row in differing:
        ref = alone[row_key(row)]
        print(f"  {row_key(row)}: {ref['prediction']!r} one by one, {row['prediction']!r} batched")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            figures = dict(vars(args), one_by_one_s=alone_s, cell_batch_s=batch_s, rows=len(batch_rows))
            figures.update(speedup=alone_s / batch_s, rows_differing=len(differing))
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
