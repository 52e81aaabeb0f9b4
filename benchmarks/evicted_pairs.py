"""What merging evicted pairs and re-rotating the kept keys cost or gain, on RULER samples.

Not a test. Each sample (RULER tasks generated as ``kvtrim bench`` generates them, ~2k tokens by
default) is compressed four ways per method and ratio — plain eviction at true positions,
``/evicted=merge``, ``/rerotate`` (kept keys moved to 0..K−1, the question at K) and both — and
answered greedily with the question never seen during compression; the score is the task's
RULER metric. ``--variants LABEL=SUFFIX,...`` compares other spec suffixes instead (each appended
to ``METHOD@RATIO``), e.g. CaM against dropping at a decoding budget, or a budget the bench cannot
sweep because it ignores the ratio (SimLayerKV). Prints one table (mean score and share of the
prefill's bytes kept, per variant) and saves every row as JSON.

    OMP_NUM_THREADS=2 python benchmarks/evicted_pairs.py [--tasks niah_single_2,niah_multivalue]
        [--samples 10] [--methods lagkv,tova,snapkv] [--ratios 0.5,0.75] [--out evicted_pairs.json]
        [--variants "drop=/decode-budget=1024,cam=/decode-budget=1024/evicted=cam"]
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
    parser.add_argument("--variants", default=None, help="LABEL=SUFFIX,... (default: the four above)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap each sample's answer")
    args = parser.parse_args()
    variants = parse_variants(args.variants) if args.variants else VARIANTS

    import kvtrim
    from kvtrim.bench.config import BenchConfig
    from kvtrim.bench.samples import build_samples, uses_chat_template

    model, tokenizer = kvtrim.load_model(args.model)
    tasks = args.tasks.split(",")
    config = BenchConfig(
        tasks=tasks,
        methods=["none"],
        ratios=[0.0],
        length=args.length,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
    )
    samples = [s for task in tasks for s in build_samples(config, tokenizer)[task]]
    chat = uses_chat_template(tokenizer, config, tasks[0])
    rows = []
    print(f"{len(samples)} samples of {', '.join(tasks)} at {args.length} tokens", flush=True)
    start = time.perf_counter()
    for method in args.methods.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for variant, part in variants.items():
                spec = f"{method}@{ratio:g}{part}"
                scores, kept = [], []
                for sample in samples:
                    session = kvtrim.compress(
                        model, tokenizer, sample.context, spec=spec, use_chat_template=chat
                    )
                    prefix = (
                        sample.answer_prefix.lstrip() if chat else sample.answer_prefix
                    )  # as kvtrim bench
                    prediction = session.ask(sample.question, sample.max_new_tokens, answer_prefix=prefix)
                    scores.append(sample.score(prediction))
                    kept.append(session.stats.kv_bytes_after / session.stats.kv_bytes_before)
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "variant": variant,
                        "spec": spec,
                        "scores": scores,
                        "bytes_kept": kept,
                    }
                )
                print(
                    f"{method:<14} {ratio:<5g} {variant:<17} {statistics.mean(scores):6.1f}"
                    f"  bytes kept {statistics.mean(kept):.3f}"
                    f"   ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print_table(rows, list(variants))
    print(f"saved {args.out}")


def parse_variants(text: str) -> dict[str, str]:
    """``LABEL=SUFFIX,...`` -> {label: suffix}; the first '=' ends the label."""
    out = {}
    for item in text.split(","):
        label, sep, suffix = item.partition("=")
        if not sep or not label.strip():
            raise SystemExit(f"--variants takes LABEL=SUFFIX items, got {item!r}")
        out[label.strip()] = suffix.strip()
    return out


def print_table(rows: list[dict], variants: list[str]) -> None:
    """Mean score per (method, ratio) and variant, with the share of the prefill's bytes kept."""
    print("\n| method | ratio | " + " | ".join(variants) + " |")
    print("|---|---:|" + "---:|" * len(variants))
    cells: dict = {}
    for row in rows:
        figures = statistics.mean(row["scores"]), statistics.mean(row["bytes_kept"])
        cells.setdefault((row["method"], row["ratio"]), {})[row["variant"]] = figures
    for (method, ratio), by_variant in cells.items():
        values = " | ".join(
            "{:.1f} ({:.0%})".format(*by_variant[v]) if v in by_variant else "–" for v in variants
        )
        print(f"| {method} | {ratio:g} | {values} |")


if __name__ == "__main__":
    main()
