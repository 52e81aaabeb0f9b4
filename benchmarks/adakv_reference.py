"""kvtrim's AdaKV against the reference library's, on the same model, samples and scorer.

Three steps, the second in an environment with kvpress (it needs transformers < 5.3, so it
lives in its own virtual environment; this file imports nothing of kvtrim there):

    python benchmarks/adakv_reference.py kvtrim OUT [--tasks niah_single_1,niah_single_2] [--samples 3]
    KVPRESS_PYTHON benchmarks/adakv_reference.py kvpress OUT
    python benchmarks/adakv_reference.py compare OUT

``kvtrim`` writes the samples' token ids, the model folder, the needle's token positions, and
per layer kvtrim's Expected Attention scores (ε = 1e-2) and the adaptive budget's kept set at
ratio 0.5. ``kvpress`` runs ``AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))`` on the same ids
and writes its scores and kept sets. ``compare`` prints, per sample, how far the two scores are
apart, how much the two kept sets overlap, whether kvtrim's adaptive budget keeps exactly the
reference's set when given the reference's scores, and the share of the needle's (head, token)
pairs each side keeps. Not a test: one line per sample, and a summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RATIO = 0.5
EPSILON = 1e-2


def dump_kvtrim(out: Path, tasks: list[str], n_samples: int, length: int) -> None:
    import kvtrim
    from kvtrim.bench.config import BenchConfig
    from kvtrim.bench.samples import build_samples
    from kvtrim.models.prompting import encode_context
    from kvtrim.scorers.expected_attention import ExpectedAttention
    from kvtrim.strategies.shared_prefill import prefill_once

    class Recording(ExpectedAttention):
        """Expected Attention that keeps each layer's scores."""

        def score(self, view):  # noqa: ANN001, ANN202 - the scorer protocol
            scores = super().score(view)
            recorded[view.layer_idx] = scores[0].clone()  # (Hkv, T)
            return scores

    model, tokenizer = kvtrim.load_model()
    config = BenchConfig(tasks=tasks, methods=["knorm"], ratios=[RATIO], length=length, samples=n_samples)
    samples = build_samples(config, tokenizer)
    items = []
    for task in tasks:
        for index, sample in enumerate(samples[task]):
            _, ids = encode_context(model, tokenizer, sample.context, None, None)
            recorded: dict[int, torch.Tensor] = {}
            scorer = Recording(epsilon=EPSILON)
            prefill = prefill_once(
                model, tokenizer, sample.context, {"ea": scorer}, [RATIO], budgets=["adaptive"]
            )
            kept = [chosen[0] for chosen in prefill.kept[("ea", RATIO, "adaptive")]]  # L × (Hkv, T)
            name = f"{task}-{index}"
            torch.save(
                {"scores": [recorded[i] for i in range(len(kept))], "kept": kept},
                out / f"{name}.kvtrim.pt",
            )
            needle = needle_positions(tokenizer, ids, sample.references[0])
            items.append({"name": name, "ids": ids, "needle": needle, "value": sample.references[0]})
    folder = str(getattr(model, "name_or_path", ""))
    (out / "samples.json").write_text(json.dumps({"model": folder, "items": items}))
    print(f"{len(items)} samples from {folder} -> {out}")


def needle_positions(tokenizer, ids: list[int], value: str) -> list[int]:  # noqa: ANN001
    """Positions of the tokens spelling ``value`` (its first occurrence) in ``ids``."""
    starts, text = [], ""
    for token in ids:
        starts.append(len(text))
        text += tokenizer.decode([token])
    at = text.find(value)
    return [i for i, start in enumerate(starts) if at <= start < at + len(value)] if at >= 0 else []


def dump_kvpress(out: Path) -> None:
    from kvpress import AdaKVPress, ExpectedAttentionPress
    from transformers import AutoModelForCausalLM, DynamicCache

    meta = json.loads((out / "samples.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        meta["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()

    class Recording(ExpectedAttentionPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):  # noqa: ANN001, ANN201
            scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
            recorded[module.layer_idx] = scores[0].clone()  # (Hkv, T)
            return scores

    for item in meta["items"]:
        recorded: dict[int, torch.Tensor] = {}
        press = AdaKVPress(Recording(compression_ratio=RATIO, epsilon=EPSILON))
        ids = torch.tensor([item["ids"]])
        with torch.inference_mode(), press(model):
            model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        kept = []
        for layer in model.model.layers:
            batch, heads, positions = layer.self_attn.masked_key_indices
            mask = torch.ones(recorded[0].shape, dtype=torch.bool)
            mask[heads, positions] = False
            kept.append(mask)
        torch.save(
            {"scores": [recorded[i] for i in range(len(kept))], "kept": kept},
            out / f"{item['name']}.kvpress.pt",
        )
        print(f"{item['name']}: done")


def compare(out: Path) -> None:
    from kvtrim.budgets import AdaptiveBudget

    meta = json.loads((out / "samples.json").read_text())
    totals: dict[str, list[float]] = {
        "jaccard": [],
        "same_given_theirs": [],
        "needle_mine": [],
        "needle_theirs": [],
    }
    print(
        "sample               score rel. diff  rank corr  kept overlap  "
        "same set on their scores  needle kept (kvtrim / ref)"
    )
    for item in meta["items"]:
        mine = torch.load(out / f"{item['name']}.kvtrim.pt")
        theirs = torch.load(out / f"{item['name']}.kvpress.pt")
        needle = torch.tensor(item["needle"])
        diffs, ranks, overlaps, same, n_mine, n_theirs = [], [], [], 0, [], []
        for layer, (s_mine, s_theirs, k_mine, k_theirs) in enumerate(
            zip(mine["scores"], theirs["scores"], mine["kept"], theirs["kept"], strict=True)
        ):
            finite = torch.isfinite(s_mine) & (s_theirs < s_theirs.max())  # the sinks apart
            diffs.append(float(((s_mine - s_theirs).abs()[finite] / s_theirs.abs()[finite]).max()))
            ranks.append(rank_correlation(s_mine[finite], s_theirs[finite]))
            overlaps.append(float((k_mine & k_theirs).sum() / (k_mine | k_theirs).sum()))
            # kvtrim's budget on the reference's scores (its sinks at max + 1 are kvtrim's +inf)
            theirs_as_mine = s_theirs.masked_fill(~finite & ~torch.isfinite(s_mine), torch.inf)
            chosen = AdaptiveBudget().select(theirs_as_mine[None], layer, len(mine["kept"]), RATIO)[0]
            same += int(torch.equal(chosen, k_theirs) or rounding_only(chosen, k_theirs))
            n_mine.append(float(k_mine[:, needle].float().mean()))
            n_theirs.append(float(k_theirs[:, needle].float().mean()))
        n_layers = len(overlaps)
        row = (
            f"{item['name']:<20} {max(diffs):>15.2e}  {min(ranks):>9.4f}  {sum(overlaps) / n_layers:>12.4f}  "
            f"{same:>17}/{n_layers}  {sum(n_mine) / n_layers:.3f} / {sum(n_theirs) / n_layers:.3f}"
        )
        print(row)
        totals["jaccard"].append(sum(overlaps) / n_layers)
        totals["same_given_theirs"].append(same / n_layers)
        totals["needle_mine"].append(sum(n_mine) / n_layers)
        totals["needle_theirs"].append(sum(n_theirs) / n_layers)
    print("mean: " + ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in totals.items()))


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [torch.argsort(torch.argsort(x.flatten())).double() for x in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def rounding_only(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """kvtrim keeps T − floor(r·T) per head on average, the reference int(T·(1 − r)): at odd T one
    pair per head more, the reference's set inside kvtrim's."""
    extra = int(mine.sum() - theirs.sum())
    return 0 < extra <= mine.shape[0] and bool((theirs <= mine).all())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=["kvtrim", "kvpress", "compare"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "kvtrim":
        dump_kvtrim(args.out, args.tasks.split(","), args.samples, args.length)
    elif args.step == "kvpress":
        dump_kvpress(args.out)
    else:
        compare(args.out)


if __name__ == "__main__":
    main()
