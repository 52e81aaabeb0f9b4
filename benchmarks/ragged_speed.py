"""Ragged (head-adaptive) caches against dense ones at the same mean kept count, in one process.

Decoding: a context is compressed once with the uniform budget and once with the adaptive one
(same scorer, ratio and total kept pairs, each head of the adaptive cache holding its own count);
then the two caches decode the same question in alternating rounds, each round from a snapshot of
the compressed cache, so that both see the same machine state. Chunked prefill (dense budgets
only) against the one-shot prefill: the context compressed both ways, again alternating. The
figures are medians over the rounds, and the ratios are measured side by side.

Not a test: it prints figures measured in one run (and saves them as JSON with --out).

    OMP_NUM_THREADS=2 python benchmarks/ragged_speed.py [--length 4096] [--ratio 0.75]
        [--method knorm] [--decode-tokens 64] [--rounds 5] [--chunk 1024] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kvtrim
from kvtrim.bench.tasks.needle import needle_sample
from kvtrim.cache.layers import cache_bytes, cache_tokens
from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.generation import greedy_decode

BUDGETS = ("uniform", "adaptive")


def decode_seconds(session: kvtrim.Session, question_ids: list[int], tokens: int) -> float:
    """Seconds to decode ``tokens`` tokens after the question; the cache is put back afterwards."""
    snapshot = CacheSnapshot.take(session.cache)
    start = time.perf_counter()
    with torch.inference_mode():
        produced = greedy_decode(
            session.model, session.cache, question_ids, session.context_length, tokens, stop_ids=set()
        )
    seconds = time.perf_counter() - start
    snapshot.restore(session.cache)
    if len(produced) != tokens:
        raise RuntimeError(f"decoded {len(produced)} tokens, not {tokens}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--method", default="knorm")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--chunk", type=int, default=1024, help="chunk size of the chunked prefill (0: skip it)"
    )
    parser.add_argument("--chunk-rounds", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = kvtrim.load_model(args.model)
    sample = needle_sample(tokenizer, args.length, depth=0.5)
    sessions = {
        budget: kvtrim.compress(
            model, tokenizer, sample.context, method=args.method, ratio=args.ratio, budget=budget
        )
        for budget in BUDGETS
    }
    layer_types = {b: sorted({type(layer).__name__ for layer in s.cache.layers}) for b, s in sessions.items()}
    question = sessions["uniform"].layout.question_text(sample.question)
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    for session in sessions.values():  # warm-up
        decode_seconds(session, question_ids, 4)

    decode_s: dict[str, list[float]] = {b: [] for b in BUDGETS}
    for round_ in range(args.rounds):
        order = BUDGETS if round_ % 2 == 0 else BUDGETS[::-1]  # ABBA: neither always goes first
        for budget in order:
            decode_s[budget].append(decode_seconds(sessions[budget], question_ids, args.decode_tokens))
    figures: dict = {
        "length": sessions["uniform"].context_length,
        "ratio": args.ratio,
        "method": args.method,
        "layer_types": layer_types,
        "kept_pairs": {b: cache_tokens(s.cache) for b, s in sessions.items()},
        "kv_bytes": {b: cache_bytes(s.cache) for b, s in sessions.items()},
        "decode_tok_s": {b: args.decode_tokens / statistics.median(v) for b, v in decode_s.items()},
        "decode_s_rounds": decode_s,
    }
    figures["decode_ragged_over_dense"] = (
        figures["decode_tok_s"]["adaptive"] / figures["decode_tok_s"]["uniform"]
    )

    if args.chunk:  # chunked prefill takes dense budgets only: its cost against the one-shot prefill
        prefill_s: dict[str, list[float]] = {"one-shot": [], "chunked": []}
        for _ in range(args.chunk_rounds):
            for mode, chunk in (("one-shot", None), ("chunked", args.chunk)):
                start = time.perf_counter()
                kvtrim.compress(
                    model, tokenizer, sample.context, method=args.method, ratio=args.ratio, chunk_size=chunk
                )
                prefill_s[mode].append(time.perf_counter() - start)
        figures["prefill_s"] = {m: statistics.median(v) for m, v in prefill_s.items()}

    print(f"{figures['length']} tokens, {args.method} at ratio {args.ratio}, {args.rounds} rounds")
    print(f"{'budget':<9} {'layers':<28} {'kept pairs':>10} {'KV MiB':>7} {'decode tok/s':>12}")
    for budget in BUDGETS:
        print(
            f"{budget:<9} {','.join(layer_types[budget]):<28} {figures['kept_pairs'][budget]:>10} "
            f"{figures['kv_bytes'][budget] / 2**20:>7.2f} {figures['decode_tok_s'][budget]:>12.2f}"
        )
    print(f"decode, ragged / dense: {figures['decode_ragged_over_dense']:.3f}x")
    if args.chunk:
        one_shot, chunked = figures["prefill_s"]["one-shot"], figures["prefill_s"]["chunked"]
        print(
            f"prefill + compression, uniform: one-shot {one_shot:.2f} s, {args.chunk}-token chunks "
            f"{chunked:.2f} s ({one_shot / chunked:.3f}x the one-shot speed)"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
