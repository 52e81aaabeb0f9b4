"""Do the learned surrogates of KVzip (KVzap, Fast KVzip) keep what KVzip keeps on a needle?

For needle haystacks on the embedded model, the share of the needle's value tokens (the digits
of the magic number) that each scorer's per-head top half keeps (uniform budget at ratio 0.5),
and the surrogates' rank correlation with KVzip over the whole context and over the needle's
tokens. A surrogate that never saw such tokens in its calibration text predicts them poorly even
where it ranks prose well. Not a test: it prints figures measured in one run.

    OMP_NUM_THREADS=2 python benchmarks/surrogate_needles.py [--length 2048] [--depths 0.25,0.5,0.75]
        [--kvzap FILE] [--fastkvzip FILE]
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

import kvtrim
from kvtrim.bench.tasks.needle import needle_sample
from kvtrim.calibration.gates import gate_log, layer_gate, load_or_fit_fastkvzip
from kvtrim.calibration.surrogates import load_or_fit_kvzap, predict_linear, spearman
from kvtrim.core.selection import top_indices
from kvtrim.models.prompting import encode, layout_for
from kvtrim.strategies.surrogates import kvzip_teacher


def value_positions(tokenizer, context: str, layout, value: str) -> list[int]:
    """Token positions (in the encoded context) covering the needle's value."""
    text = layout.context_text
    start = text.index(value, text.index(context[:20]))
    enc = tokenizer(text, add_special_tokens=layout.add_special_tokens, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(value) and b > start]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--kvzap", default=None, help="a kvzap.safetensors to test (default: the cached fit)")
    parser.add_argument("--fastkvzip", default=None, help="a fastkvzip.safetensors (default: the cached one)")
    args = parser.parse_args()
    model, tokenizer = kvtrim.load_model()
    kvzap = (load_file(args.kvzap) if args.kvzap else load_or_fit_kvzap(model, tokenizer))["weights"]
    gates = load_file(args.fastkvzip) if args.fastkvzip else load_or_fit_fastkvzip(model, tokenizer)
    kept = {"kvzip": [], "kvzap": [], "fastkvzip": []}
    rho_all = {"kvzap": [], "fastkvzip": []}
    rho_needle = {"kvzap": [], "fastkvzip": []}
    for depth in (float(d) for d in args.depths.split(",")):
        sample = needle_sample(tokenizer, args.length, depth)
        layout = layout_for(tokenizer, sample.context, False)  # as the teacher encodes it
        needle = value_positions(tokenizer, sample.context, layout, sample.answer)
        seq = len(encode(tokenizer, layout.context_text, layout.add_special_tokens))
        for idx, (hidden, teacher) in kvzip_teacher(model, tokenizer, sample.context, 0).items():
            predicted = {
                "kvzap": predict_linear(kvzap[idx].double(), hidden.double()).T.float(),  # (Hkv, T)
                "fastkvzip": gate_log(layer_gate(gates, idx), hidden.float()).T,
            }
            for name, scores in {"kvzip": teacher, **predicted}.items():
                scores = scores.clone()
                scores[:, :4] = torch.inf
                top = top_indices(scores[None], seq - seq // 2)[0]  # (Hkv, K) uniform at 0.5
                hits = torch.isin(top, torch.tensor(needle)).sum(-1).float() / len(needle)  # (Hkv,)
                kept[name].append(hits.mean())
            for name, scores in predicted.items():
                for h in range(teacher.shape[0]):
                    rho_all[name].append(spearman(scores[h, 4:], teacher[h, 4:]))
                    rho_needle[name].append(
                        float((scores[h, needle] > scores[h, 4:].median()).float().mean())
                    )
        print(f"depth {depth}: needle value tokens {needle} of {seq}", flush=True)
    print(
        "\nshare of the needle's value tokens kept per head at ratio 0.5 (uniform), "
        "mean over layers and depths"
    )
    for name, values in kept.items():
        print(f"  {name:<10} {float(torch.stack(values).mean()):.3f}")
    print("\nsurrogate vs KVzip: Spearman over the context, and share of needle tokens above the median")
    for name in rho_all:
        print(
            f"  {name:<10} rho {sum(rho_all[name]) / len(rho_all[name]):.3f}   "
            f"needle above median {sum(rho_needle[name]) / len(rho_needle[name]):.3f}"
        )


if __name__ == "__main__":
    main()
