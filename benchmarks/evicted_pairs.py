"""What merging evicted pairs and re-rotating the kept keys cost or gain, on RULER samples.

Not a test. Each sample (RULER tasks generated as ``kvtrim bench`` generates them, ~2k tokens by
default) is compressed four ways per method and ratio — plain eviction at true positions,
``/evicted=merge``, ``/rerotate`` (kept keys moved to 0..K−1, the question at K) and both — and
answered greedily with the question never seen during compression; the score is the task's
RULER metric. Prints one table (mean score per variant) and saves every row as JSON.

    OMP_NUM_THREADS=2 python benchmarks/evicted_pairs.py [--tasks niah_single_2,niah_multivalue]
        [--samples 10] [--methods lagkv,tova,snapkv] [--ratios 0.5,0.75] [--out evicted_pairs.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

VARIANTS = {
    "true positions": "",
    "merge": "/evicted=merge",
    "rerotate": "/rerotate",
    "merge + rerotate": "/evicted=merge/rerotate",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--tasks", default="niah_single_2,niah_multivalue")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--methods", default="lagkv,tova,snapkv")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--out", default="evicted_pairs.json")
    args = parser.parse_args()

    import kvtrim
    from kvtrim.bench.config import BenchConfig
    from kvtrim.bench.samples import build_samples, uses_chat_template

    model, tokenizer = kvtrim.load_model(args.model)
    tasks = args.tasks.split(",")
    config = BenchConfig(
        tasks=tasks, methods=["none"], ratios=[0.0], length=args.length, samples=args.samples
    )
    samples = [s for task in tasks for s in build_samples(config, tokenizer)[task]]
    chat = uses_chat_template(tokenizer, config, tasks[0])
    rows = []
    print(f"{len(samples)} samples of {', '.join(tasks)} at {args.length} tokens", flush=True)
    start = time.perf_counter()
    for method in args.methods.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for variant, part in VARIANTS.items():
                spec = f"{method}@{ratio:g}{part}"
                scores = []
                for sample in samples:
                    session = kvtrim.compress(
                        model, tokenizer, sample.context, spec=spec, use_chat_template=chat
                    )
                    prefix = (
                        sample.answer_prefix.lstrip() if chat else sample.answer_prefix
                    )  # as kvtrim bench
                    prediction = session.ask(sample.question, sample.max_new_tokens, answer_prefix=prefix)
                    scores.append(sample.score(prediction))
                rows.append(
                    {"method": method, "ratio": ratio, "variant": variant, "spec": spec, "scores": scores}
                )
                print(
                    f"{method:<14} {ratio:<5g} {variant:<17} {statistics.mean(scores):6.1f}"
                    f"   ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print_table(rows)
    print(f"saved {args.out}")


def print_table(rows: list[dict]) -> None:
    print("\n| method | ratio | " + " | ".join(VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["method"], row["ratio"]), {})[row["variant"]] = statistics.mean(row["scores"])
    for (method, ratio), by_variant in cells.items():
        values = " | ".join(f"{by_variant.get(v, float('nan')):.1f}" for v in VARIANTS)
        print(f"| {method} | {ratio:g} | {values} |")


if __name__ == "__main__":
    main()
