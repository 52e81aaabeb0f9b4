"""Which layers keep the needle? For one RULER sample, the fraction of (KV head, needle-value
token) pairs each method keeps, layer by layer, at one ratio.

A method that drops a few digits of the value in a few heads of the layers that copy it makes the
model answer a truncated number; this shows where. Not a test: it prints one line per method.

    python benchmarks/needle_kept.py [--task niah_single_1] [--index 0] [--ratio 0.5]
        [--methods snapkv-query-aware,snapkv,tova,keydiff,knorm] [--model M]
"""

from __future__ import annotations

import argparse

import torch

import kvtrim
from kvtrim.bench.config import BenchConfig
from kvtrim.bench.samples import build_samples
from kvtrim.models.prompting import encode_context
from kvtrim.scorers import make_scorer
from kvtrim.strategies.shared_prefill import prefill_once


def char_starts(tokenizer, ids: list[int]) -> tuple[list[int], str]:
    """Where each token starts in the prompt decoded token by token, and that text."""
    starts, text = [], ""
    for token in ids:
        starts.append(len(text))
        text += tokenizer.decode([token])
    return starts, text


def value_positions(tokenizer, ids: list[int], value: str) -> list[int]:
    """Positions of the tokens that spell ``value`` (its first occurrence) in ``ids``."""
    starts, text = char_starts(tokenizer, ids)
    at = text.find(value)
    if at < 0:
        raise SystemExit(f"{value!r} not found in the prompt")
    return [i for i, start in enumerate(starts) if at <= start < at + len(value)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", default="snapkv-query-aware,snapkv,tova,keydiff,knorm")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    model, tokenizer = kvtrim.load_model(args.model)
    config = BenchConfig(
        tasks=[args.task], methods=["knorm"], ratios=[args.ratio], length=args.length, samples=args.index + 1
    )
    sample = build_samples(config, tokenizer)[args.task][args.index]
    print(
        f"{args.task} #{args.index}, value {sample.references[0]!r}, ratio {args.ratio}: kept share per layer"
    )
    for method in args.methods.split(","):
        question = sample.question if make_scorer(method).query_aware else None
        _, ids = encode_context(model, tokenizer, sample.context, None, question)
        positions = torch.tensor(value_positions(tokenizer, ids, sample.references[0]))
        prefill = prefill_once(model, tokenizer, sample.context, [method], [args.ratio], question=question)
        shares = []
        for chosen in prefill.kept[(method, args.ratio, "uniform")]:
            if chosen is None:
                shares.append(1.0)
                continue
            kept = chosen[0]  # (Hkv, K) kept positions
            hits = torch.stack([torch.isin(positions, kept[h]) for h in range(kept.shape[0])]).float()
            shares.append(hits.mean().item())
        full = sum(s == 1.0 for s in shares)
        print(f"{method:<20} {full:>2}/{len(shares)} layers whole: " + " ".join(f"{s:.2f}" for s in shares))


if __name__ == "__main__":
    main()
