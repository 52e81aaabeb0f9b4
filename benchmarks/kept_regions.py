"""Which parts of a needle prompt a method keeps, and which of them the answer needs.

For RULER needle samples, the prompt is cut into regions — the first 4 tokens (attention sinks),
the instructions before the haystack, the key phrases of the needles holding an answer ("One of
the special magic numbers for KEY is:"), their values, the other needles (distractors, key and
value), the last 64 context tokens, and the rest of the haystack — and the script prints the share
of each region a method keeps in each compressed layer, and how many of the answer's values each
layer keeps whole. Value tokens are also split by how often their token id occurs among all the
needles' values (once, or more), which shows whether a method keeps a repeated digit less often
than a unique one. Tasks with several needles (multikey, multivalue) are cut the same way. With ``--force``
it then answers every sample again with the same method and budget but the named regions always
kept (their scores set to +inf, so they displace other pairs: the kept count is unchanged), which
tells which dropped region cost the answers. Not a test; one line per (sample, layer) and a table.

    OMP_NUM_THREADS=2 python benchmarks/kept_regions.py --model gemma3-270m --task niah_single_2 \\
        --samples 10 --method tova --ratio 0.5 [--force sinks,key,value,instructions,tail] [--one-needle]
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass, replace

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

REGIONS = ("sinks", "instructions", "key", "value", "distractors", "tail", "haystack")
NEEDLE = re.compile(r"One of the special magic [a-z]+ for [^\n]*? is: ")
NEEDLE_VALUE = re.compile(r"[0-9a-f-]+")  # a RULER needle's value: digits, or a UUID


def needles(text: str) -> list[tuple[int, int, int]]:
    """(key phrase start, value start, value end) character offsets of every needle in the text."""
    out = []
    for match in NEEDLE.finditer(text):
        value = NEEDLE_VALUE.match(text, match.end())
        if value is not None:
            out.append((match.start(), value.start(), value.end()))
    return out


def regions(tokenizer, ids: list[int], sample: Sample, context_tokens: int) -> dict[str, list[int]]:
    """Token positions of each region of a needle prompt, and ``value:i`` for the i-th answer."""
    starts, text = char_starts(tokenizer, ids)
    found = needles(text)
    answers = set(sample.references)
    holding = [n for n in found if text[n[1] : n[2]].rstrip("-") in answers]
    if len(holding) < len(answers):
        raise SystemExit(f"the needles holding {sorted(answers)} were not all found in the prompt")
    haystack_from = text.find("\n", text.find("afterwards")) + 1  # RULER: "...quiz you ... afterwards."

    def span(lo: int, hi: int) -> list[int]:
        return [i for i, s in enumerate(starts[:context_tokens]) if lo <= s < hi]

    out = {
        "sinks": list(range(4)),
        "instructions": [i for i in span(0, haystack_from) if i >= 4],
        "key": [i for key_at, at, _ in holding for i in span(key_at, at)],
        "value": [i for _, at, end in holding for i in span(at, end)],
        "distractors": [i for n in found if n not in holding for i in span(n[0], n[2])],
        "tail": list(range(context_tokens - 64, context_tokens)),
    }
    taken = {i for positions in out.values() for i in positions}
    out["haystack"] = [i for i in range(context_tokens) if i not in taken]
    for index, (_, at, end) in enumerate(holding):
        out[f"value:{index}"] = span(at, end)
    needle_values = [ids[i] for _, at, end in found for i in span(at, end)]
    out["value once"] = [i for i in out["value"] if needle_values.count(ids[i]) == 1]
    out["value repeated"] = [i for i in out["value"] if needle_values.count(ids[i]) > 1]
    return out


def one_needle(sample: Sample) -> Sample:
    """The sample with every needle but the first one holding an answer cut out of its context.

    The needle sentences are removed with the space after them, so the haystack is otherwise the
    same text; the references become that one value. Comparing a method's kept share of a value
    alone and among other needles shows whether the other needles cost it the value.
    """
    found = needles(sample.context)
    answers = set(sample.references)
    first = next(n for n in found if sample.context[n[1] : n[2]] in answers)
    text = sample.context
    for key_at, _, end in (n for n in reversed(found) if n != first):
        cut = end + 1 if text[end : end + 1] == "." else end
        cut += 1 if text[cut : cut + 1] == " " else 0
        text = text[:key_at] + text[cut:]
    return replace(sample, context=text, references=[sample.context[first[1] : first[2]]])


def whole_values(prefill, method: str, ratio: float, parts: dict[str, list[int]]) -> list[float]:
    """Per compressed layer: how many answer values keep every token, averaged over the KV heads."""
    out = []
    values = [parts[name] for name in parts if name.startswith("value:")]
    for chosen in prefill.kept[(method, ratio, "uniform")]:
        if chosen is None:
            continue
        kept = chosen[0]  # (Hkv, K) kept positions
        out.append(
            sum(
                torch.isin(torch.tensor(v), kept[h]).all().item()
                for v in values
                for h in range(kept.shape[0])
            )
            / kept.shape[0]
        )
    return out


SHOWN = (*REGIONS, "value once", "value repeated")


def mean_of(shares: list[float]) -> float:
    """Mean over the shares that exist (a region can be empty in a sample: no distractors)."""
    present = [x for x in shares if x == x]
    return statistics.mean(present) if present else float("nan")


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
            if not positions:
                shares[name] = float("nan")
                continue
            where = torch.tensor(positions, dtype=torch.long)
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
    parser.add_argument(
        "--one-needle",
        action="store_true",
        help="cut every needle but the first answer's out of each context",
    )
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
    if args.one_needle:
        samples = [one_needle(sample) for sample in samples]
    chat = uses_chat_template(tokenizer, config, args.task)
    variants = ["as is"] + [v for v in args.force.split(",") if v]
    scores: dict[str, list[float]] = {v: [] for v in variants}
    means: dict[str, list[float]] = {name: [] for name in SHOWN}
    for index, sample in enumerate(samples):
        _, ids = encode_context(model, tokenizer, sample.context, None, None)
        prefill = prefill_once(model, tokenizer, sample.context, [args.method], [args.ratio])
        parts = regions(tokenizer, ids, sample, len(ids))
        whole = whole_values(prefill, args.method, args.ratio, parts)
        n_values = sum(name.startswith("value:") for name in parts)
        for layer, shares in enumerate(kept_shares(prefill, args.method, args.ratio, parts)):
            for name in SHOWN:
                means[name].append(shares[name])
            print(
                f"#{index} compressed layer {layer}: "
                + " ".join(f"{n} {shares[n]:.2f}" for n in SHOWN)
                + f" | values whole {whole[layer]:.2f}/{n_values}"
            )
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
    print("\nmean kept share per region: " + " ".join(f"{n} {mean_of(means[n]):.2f}" for n in SHOWN))
    print(f"\n| {args.method}@{args.ratio:g}, regions always kept | {args.task} score |\n|---|---:|")
    for variant in variants:
        print(f"| {variant} | {statistics.mean(scores[variant]):.1f} |")


if __name__ == "__main__":
    main()
