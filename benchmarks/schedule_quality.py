"""Answer quality of the eviction schedules at an equal final budget, on the embedded model.

Not a test: the single-needle probe (RULER ``niah_single_1`` layout, ~2k tokens, 10 depths) is
compressed to the same final budget three ways — one-shot after the prefill, chunked prefill
(``--chunk`` tokens at a time, evicting after each chunk), and one-shot followed by decoding
eviction held at that budget (``decode_budget`` = the kept count, every 16 tokens) — and each
answer is checked for the needle. Prints a table and saves JSON.

    python benchmarks/schedule_quality.py [--methods knorm,expected-attention,qfilters,streaming-llm]
        [--ratio 0.5] [--length 2000] [--chunk 512] [--out schedule_quality.json]
"""

from __future__ import annotations

import argparse
import json
import time

DEPTHS = [i / 9 for i in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="knorm,expected-attention,qfilters,streaming-llm")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--out", default="schedule_quality.json")
    args = parser.parse_args()

    import kvtrim
    from kvtrim.bench.tasks.needle import needle_sample
    from kvtrim.core.ratios import n_keep
    from kvtrim.models import encode_context

    model, tokenizer = kvtrim.load_model()
    samples = [needle_sample(tokenizer, args.length, depth, seed=i) for i, depth in enumerate(DEPTHS)]
    schedules = {
        "one-shot": lambda n: {},
        f"chunked ({args.chunk})": lambda n: {"chunk_size": args.chunk},
        "decoding": lambda n: {"decode_budget": n_keep(n, args.ratio), "evict_every": 16},
    }
    rows = []
    print(f"{'method':<20} {'schedule':<14} {'found':>5}  per depth (0% … 100%)   {'s':>6}", flush=True)
    for method in args.methods.split(","):
        for schedule, options in schedules.items():
            start = time.perf_counter()
            hits = []
            for sample in samples:
                n_tokens = len(encode_context(model, tokenizer, sample.context, None)[1])
                session = kvtrim.compress(
                    model, tokenizer, sample.context, method, args.ratio, **options(n_tokens)
                )
                hits.append(int(sample.answer in session.ask(sample.question, max_new_tokens=24)))
            elapsed = time.perf_counter() - start
            rows.append({"method": method, "schedule": schedule, "ratio": args.ratio, "hits": hits})
            print(
                f"{method:<20} {schedule:<14} {sum(hits):>2}/{len(hits)}  {' '.join(map(str, hits))}"
                f"   {elapsed:>6.0f}",
                flush=True,
            )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
