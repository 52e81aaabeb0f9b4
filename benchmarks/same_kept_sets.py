"""Does a change keep the same pairs? The kept keys and values of every layer and head, compressed
by the current code and by an earlier revision, on the same embedded-model samples.

Speed work must not buy its figures with different results: this runs each revision in its own
process (the earlier one from a temporary ``git worktree``), dumps every session's kept pairs,
and counts the layers whose tensors are bit-identical and the pairs that one side kept and the
other did not (a pair is identified by its key vector). Not a test: it prints one line per cell.

    OMP_NUM_THREADS=2 python benchmarks/same_kept_sets.py --baseline HEAD~3 \\
        [--methods knorm,snapkv] [--lengths 1024,4096] [--budgets uniform,adaptive] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dump(out: str, methods: list[str], lengths: list[int], budgets: list[str], ratio: float) -> None:
    """Compress every cell with the kvtrim found on sys.path and save its kept pairs to ``out``."""
    from safetensors.torch import save_file

    import kvtrim
    from kvtrim.bench.tasks.needle import needle_sample
    from kvtrim.cache.layers import head_pairs

    model, tokenizer = kvtrim.load_model()
    tensors = {}
    for length in lengths:
        context = needle_sample(tokenizer, length, depth=0.5).context
        for method in methods:
            for budget in budgets:
                session = kvtrim.compress(
                    model, tokenizer, context, method=method, ratio=ratio, budget=budget
                )
                for layer_idx, layer in enumerate(session.cache.layers):
                    for head, (keys, values) in enumerate(head_pairs(layer)):
                        name = f"{length}/{method}/{budget}/{layer_idx}/{head}"
                        tensors[f"{name}/k"] = keys.contiguous().clone()
                        tensors[f"{name}/v"] = values.contiguous().clone()
                print(f"  {Path(out).stem}: {length} {method} {budget}", flush=True)
    save_file(tensors, out)


def compare(baseline: str, current: str) -> None:
    """One line per cell: layers bit-identical, and pairs kept by one side only."""
    from safetensors.torch import load_file

    old, new = load_file(baseline), load_file(current)
    cells = sorted({name.rsplit("/", 3)[0] for name in new}, key=lambda c: (int(c.split("/")[0]), c))
    print(f"{'cell':<44} {'layers identical':>16} {'pairs differing':>18}")
    for cell in cells:
        layers = sorted({int(n.split("/")[3]) for n in new if n.startswith(cell + "/")})
        identical = differing = total = 0
        for layer in layers:
            prefix = f"{cell}/{layer}/"
            heads = sorted({int(n.split("/")[4]) for n in new if n.startswith(prefix)})
            same = True
            for head in heads:
                a_k, b_k = old[f"{prefix}{head}/k"], new[f"{prefix}{head}/k"]
                a_v, b_v = old[f"{prefix}{head}/v"], new[f"{prefix}{head}/v"]
                same = same and a_k.shape == b_k.shape and bool((a_k == b_k).all() and (a_v == b_v).all())
                kept_old = {tuple(row.tolist()) for row in a_k}
                differing += sum(tuple(row.tolist()) not in kept_old for row in b_k)
                total += b_k.shape[0]
            identical += same
        print(f"{cell:<44} {identical:>10}/{len(layers):<5} {differing:>9}/{total:<8}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    parser.add_argument(
        "--methods",
        default="knorm,expected-attention,expected-attention-calibrated,snapkv,tova,lagkv,leverage,"
        "chunkkv,critical,keydiff,cur,qfilters,observed-attention",
    )
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--budgets", default="uniform")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--dump", default=None, help=argparse.SUPPRESS)  # internal: one side's run
    args = parser.parse_args()
    methods, budgets = args.methods.split(","), args.budgets.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.dump:
        dump(args.dump, methods, lengths, budgets, args.ratio)
        return
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True
        )
        try:
            forwarded = ["--methods", args.methods, "--lengths", args.lengths, "--budgets", args.budgets]
            forwarded += ["--ratio", str(args.ratio)]
            for side, src in (("baseline", tree / "src"), ("current", ROOT / "src")):
                env = {**os.environ, "PYTHONPATH": str(src)}
                out = str(Path(scratch) / f"{side}.safetensors")
                subprocess.run([sys.executable, __file__, *forwarded, "--dump", out], check=True, env=env)
            compare(str(Path(scratch) / "baseline.safetensors"), str(Path(scratch) / "current.safetensors"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
