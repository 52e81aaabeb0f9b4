"""Which parts of a needle prompt a method keeps, and which of them the answer needs.

For RULER needle samples, the prompt is cut into regions — the first 4 tokens (attention sinks),
the instructions before the haystack, the needle's key phrase ("One of the special magic numbers
for KEY is:"), its value, the last 64 context tokens, and the rest of the haystack — and the
script prints the share of each region a method keeps in each compressed layer. With ``--force``
it then answers every sample again with the same method and budget but the named regions always
kept (their scores set to +inf, so they displace other pairs: the kept count is unchanged), which
tells which dropped region cost the answers. Not a test; one line per (sample, layer) and a table.

    OMP_NUM_THREADS=2 python benchmarks/kept_regions.py --model gemma3-270m --task niah_single_2 \\
        --samples 10 --method tova --ratio 0.5 [--force sinks,key,value,instructions,tail]
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass

import torch
from needle_kept import char_starts  # benchmarks/ is on the path when a script here runs

import kvtrim
from kvtrim.bench.config import BenchConfig
from kvtrim.bench.samples import build_samples, uses_chat_template
from kvtrim.bench.tasks.sample import Sample
from kvtrim.models.prompting import encode_context
from kvtrim.scorers import make_scorer
from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.strategies.shared_prefill import prefill_once

REGIONS = ("sinks", "instructions", "key", "value", "tail", "haystack")
NEEDLE = re.compile(r"One of the special magic [a-z]+ for [^\n]*? is: ")


def regions(tokenizer, ids: list[int], sample: Sample, context_tokens: int) -> dict[str, list[int]]:
    """Token positions of each region of a needle prompt (the first needle holding the value)."""
    starts, text = char_starts(tokenizer, ids)
    value = sample.references[0]
    at = text.find(value)
    needle = [m for m in NEEDLE.finditer(text) if m.end() <= at]
    if at < 0 or not needle:
        raise SystemExit(f"no needle holding {value!r} found in the prompt")
    key_from, key_to = needle[-1].start(), at
    haystack_from = text.find("\n", text.find("afterwards")) + 1  # RULER: "...quiz you ... afterwards."

    def span(lo: int, hi: int) -> list[int]:
        return [i for i, s in enumerate(starts[:context_tokens]) if lo <= s < hi]

    out = {
        "sinks": list(range(4)),
        "instructions": [i for i in span(0, haystack_from) if i >= 4],
        "key": span(key_from, key_to),
        "value": span(at, at + len(value)),
        "tail": list(range(context_tokens - 64, context_tokens)),
    }
    taken = {i for positions in out.values() for i in positions}
    out["haystack"] = [i for i in range(context_tokens) if i not in taken]
    return out


@dataclass
class ForcedRegions(Scorer):
    """A scorer's own scores, with some positions always kept (+inf)."""

    base: Scorer | None = None
    positions: tuple[int, ...] = ()
    name = "forced"

    def __post_init__(self) -> None:
        assert self.base is not None
        if self.base.needs_reconstruction or self.base.query_aware:
            raise SystemExit(f"--force needs a scorer that scores in the prefill, not {self.base.name!r}")
        self.uses_budget = self.base.uses_budget  # what the planner asks of the scorer it wraps
        self.chunkable = self.base.chunkable

    def setup(self, model, tokenizer) -> None:
        assert self.base is not None
        self.base.setup(model, tokenizer)

    def score(self, view: LayerView) -> torch.Tensor:
        assert self.base is not None
        scores = self.base.score(view)  # (B, Hkv, T)
        forced = torch.isin(view.key_positions.to(scores.device), torch.tensor(self.positions))  # (T,)
        return scores.masked_fill(forced, torch.inf)


def kept_shares(prefill, method: str, ratio: float, parts: dict[str, list[int]]) -> list[dict[str, float]]:
    """Per compressed layer: the share of each region's (KV head, position) pairs kept."""
    out = []
    for chosen in prefill.kept[(method, ratio, "uniform")]:
        if chosen is None:
            continue
        kept = chosen[0]  # (Hkv, K) kept positions
        shares = {}
        for name, positions in parts.items():
            where = torch.tensor(positions)
            shares[name] = (
                torch.stack([torch.isin(where, kept[h]) for h in range(kept.shape[0])]).float().mean().item()
            )
        out.append(shares)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--method", default="tova")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--force", default="", help="comma-separated region sets to force, '+' joins regions")
    args = parser.parse_args()

    model, tokenizer = kvtrim.load_model(args.model)
    config = BenchConfig(
        tasks=[args.task],
        methods=[args.method],
        ratios=[args.ratio],
        length=args.length,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
    )
    samples = build_samples(config, tokenizer)[args.task]
    chat = uses_chat_template(tokenizer, config, args.task)
    variants = ["as is"] + [v for v in args.force.split(",") if v]
    scores: dict[str, list[float]] = {v: [] for v in variants}
    means: dict[str, list[float]] = {name: [] for name in REGIONS}
    for index, sample in enumerate(samples):
        _, ids = encode_context(model, tokenizer, sample.context, None, None)
        prefill = prefill_once(model, tokenizer, sample.context, [args.method], [args.ratio])
        parts = regions(tokenizer, ids, sample, len(ids))
        for layer, shares in enumerate(kept_shares(prefill, args.method, args.ratio, parts)):
            for name in REGIONS:
                means[name].append(shares[name])
            print(f"#{index} compressed layer {layer}: " + " ".join(f"{n} {shares[n]:.2f}" for n in REGIONS))
        prefix = sample.answer_prefix.lstrip() if chat else sample.answer_prefix  # as kvtrim bench
        for variant in variants:
            forced = [i for name in variant.split("+") if variant != "as is" for i in parts[name]]
            method = (
                ForcedRegions(base=make_scorer(args.method), positions=tuple(forced))
                if forced
                else args.method
            )
            session = kvtrim.compress(
                model, tokenizer, sample.context, method, args.ratio, use_chat_template=chat
            )
            answer = session.ask(sample.question, sample.max_new_tokens, answer_prefix=prefix)
            scores[variant].append(sample.score(answer))
            print(
                f"#{index} {variant:<24} score {scores[variant][-1]:5.1f}  {answer.strip()[:60]!r}",
                flush=True,
            )
    print(
        "\nmean kept share per region: " + " ".join(f"{n} {statistics.mean(means[n]):.2f}" for n in REGIONS)
    )
    print(f"\n| {args.method}@{args.ratio:g}, regions always kept | {args.task} score |\n|---|---:|")
    for variant in variants:
        print(f"| {variant} | {statistics.mean(scores[variant]):.1f} |")


if __name__ == "__main__":
    main()
