"""KV bytes, peak KV and process memory, prefill / compression time and decode speed, for
uniform, adaptive (ragged heads), chunked and decoding (evict while decoding) modes, on the
embedded model.

Not a test: figures measured in one run, printed as a table and saved as JSON. Each cell runs in
its own process, so the peak RSS (``ru_maxrss``) is that cell's alone.

    python benchmarks/memory_speed.py [--lengths 2048,4096,8192] [--ratios 0,0.5,0.75,0.9]
        [--modes uniform,adaptive,chunked] [--method expected-attention] [--chunk 512]
        [--decode-tokens 128] [--out memory_speed.json]

Mode ``decoding`` compresses like ``uniform`` and then keeps the cache at the kept count while
decoding (``decode_budget`` = kept pairs, evicting every 16 tokens). On CUDA the peak allocated
GPU memory of the cell is reported too.

Peak KV is the largest cache held at any instant of the prefill (kvtrim compresses each layer right
after its attention, so even one-shot compression never holds the whole uncompressed cache); "full
KV" is what an uncompressed cache — or a library that compresses after the prefill — holds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext


def run_cell(length: int, ratio: float, mode: str, method: str, chunk: int, decode_tokens: int) -> dict:
    """Runs inside a fresh process; returns the cell's figures."""
    import torch

    import kvtrim
    from kvtrim.bench.tasks.needle import needle_sample
    from kvtrim.core.ratios import n_keep
    from kvtrim.generation import greedy_decode
    from kvtrim.models import max_context
    from kvtrim.models.prompting import encode_context

    torch.manual_seed(0)
    model, tokenizer = kvtrim.load_model()
    # the prompt template, the question and the decoded tokens must fit in the model's window too
    target = min(length, max_context(model) - decode_tokens - 64)
    sample = needle_sample(tokenizer, target, depth=0.5)
    kwargs: dict = {"method": method if ratio > 0 else "none", "ratio": ratio}
    if mode == "adaptive" and ratio > 0:
        kwargs["budget"] = "adaptive"
        if method == "expected-attention":
            kwargs["epsilon"] = 1e-2  # the head-wise configuration of the paper's leaderboard
    elif mode == "chunked" and ratio > 0:
        kwargs["chunk_size"] = chunk
    elif mode == "decoding" and ratio > 0:
        _, ids = encode_context(model, tokenizer, sample.context, None)
        kwargs["decode_budget"] = n_keep(len(ids), ratio)  # the prefill's kept count, held while decoding
    session = kvtrim.compress(model, tokenizer, sample.context, **kwargs)
    question = session.tokenizer(session.layout.question_text(sample.question), add_special_tokens=False)
    evicting = session.compressor.attached() if session.compressor is not None else nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), evicting:
        produced = greedy_decode(
            model, session.cache, question["input_ids"], session.context_length, decode_tokens, stop_ids=set()
        )
    decode_s = time.perf_counter() - start
    stats = session.stats
    head_dim = model.config.head_dim
    element_size = next(model.parameters()).element_size()
    return {
        "tokens": session.context_length,
        "ratio": ratio,
        "mode": mode,
        "method": kwargs["method"],
        "kv_bytes_full": stats.kv_bytes_before,
        "kv_bytes": stats.kv_bytes_after,
        "kv_bytes_kept_pairs": stats.kv_tokens_after * 2 * head_dim * element_size,
        "kv_bytes_peak": stats.kv_bytes_peak or stats.kv_bytes_before,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "prefill_s": session.prefill_s,
        "compress_s": stats.compress_s,
        "decode_tok_s": len(produced) / decode_s,
        "decode_evictions": stats.decode_evictions,
        "device": str(next(model.parameters()).device),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def print_decode_ratios(rows: list[dict]) -> None:
    """Each mode's decode speed against the uniform (dense) cache of the same length and ratio:
    ``adaptive`` holds ragged heads with the same mean kept count, so its line is ragged / dense.
    One decode per cell: for a careful ragged / dense figure, benchmarks/ragged_speed.py alternates
    rounds on the very same kept pairs."""
    dense = {(row["tokens"], row["ratio"]): row for row in rows if row["mode"] == "uniform"}
    for row in rows:
        base = dense.get((row["tokens"], row["ratio"]))
        if row["mode"] == "uniform" or base is None or not base["decode_tok_s"]:
            continue
        print(
            f"{row['mode']} / uniform decode speed at {row['tokens']} tokens, ratio {row['ratio']:g}: "
            f"{row['decode_tok_s'] / base['decode_tok_s']:.3f}×"
        )


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--ratios", default="0,0.5,0.75,0.9")
    parser.add_argument("--modes", default="uniform,adaptive,chunked")
    parser.add_argument("--method", default="expected-attention")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--out", default="memory_speed.json")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell
    args = parser.parse_args()

    if args.cell:
        length, ratio, mode = args.cell.split(":")
        print(
            json.dumps(run_cell(int(length), float(ratio), mode, args.method, args.chunk, args.decode_tokens))
        )
        return

    rows = []
    mib = 1024 * 1024
    header = (
        f"{'tokens':>6} {'ratio':>5} {'mode':<8} {'KV MiB':>7} {'kept/pairs':>10} {'peak KV':>8} "
        f"{'full KV':>8} {'RSS MiB':>8} {'CUDA MiB':>8} {'prefill s':>9} {'compr s':>7} {'decode t/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for length in (int(x) for x in args.lengths.split(",")):
        for ratio in (float(x) for x in args.ratios.split(",")):
            for mode in args.modes.split(","):
                if ratio == 0 and mode != "uniform":
                    continue  # nothing evicted: every mode is the plain cache
                command = [
                    sys.executable,
                    __file__,
                    "--cell",
                    f"{length}:{ratio}:{mode}",
                    "--method",
                    args.method,
                    "--chunk",
                    str(args.chunk),
                    "--decode-tokens",
                    str(args.decode_tokens),
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                kept = row["kv_bytes"] / row["kv_bytes_kept_pairs"]
                print(
                    f"{row['tokens']:>6} {ratio:>5g} {mode:<8} {row['kv_bytes'] / mib:>7.1f} {kept:>10.4f} "
                    f"{row['kv_bytes_peak'] / mib:>8.1f} {row['kv_bytes_full'] / mib:>8.1f} "
                    f"{row['rss_peak_mib']:>8.0f} {_mib(row['cuda_peak_mib']):>8} {row['prefill_s']:>9.2f} "
                    f"{row['compress_s']:>7.3f} {row['decode_tok_s']:>10.1f}",
                    flush=True,
                )
    print_decode_ratios(rows)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
