"""The same sweep on the embedded model run locally, then on Ray with 1 and 2 workers (one thread
each), in one run: wall time of each, and whether the rows are identical (every field but timings).

Not a test. Run it alone (it starts a local Ray instance with as many CPUs as workers):

    python benchmarks/ray_scaling.py [--tasks niah_single_1,vt] [--samples 2] [--length 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import kvtrim
from kvtrim.bench.config import BenchConfig, resolve_tasks
from kvtrim.bench.distributed import RayOptions, ray_module, run_bench_on_ray
from kvtrim.bench.results import row_key
from kvtrim.bench.run import run_bench
from kvtrim.bench.samples import build_samples

COMPARED = ("prediction", "score", "kv_bytes_after", "kv_tokens_after", "kv_bytes_before")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="niah_single_1,vt")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--methods", default="knorm,tova,snapkv")
    parser.add_argument("--ratios", default="0,0.5")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    config = BenchConfig(
        tasks=resolve_tasks(args.tasks),
        methods=args.methods.split(","),
        ratios=[float(r) for r in args.ratios.split(",")],
        length=args.length,
        samples=args.samples,
    )
    root = Path(tempfile.mkdtemp(prefix="kvtrim-ray-scaling-"))
    torch.set_num_threads(1)
    model, tokenizer = kvtrim.load_model(args.model)
    samples = build_samples(config, tokenizer)
    n_samples = sum(len(v) for v in samples.values())
    start = time.perf_counter()
    local = run_bench(model, tokenizer, config, root / "local", samples=samples, progress=False)
    timings = {"local (1 thread)": time.perf_counter() - start}
    reference = {row_key(r): {f: r.get(f) for f in COMPARED} for r in local.rows}
    ray = ray_module()
    identical = {}
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            start = time.perf_counter()
            run = run_bench_on_ray(
                args.model,
                config,
                root / f"ray-{workers}",
                samples,
                RayOptions(workers=workers),
                progress=False,
            )
            label = f"ray, {workers} worker{'s' if workers > 1 else ''} (1 thread each)"
            timings[label] = time.perf_counter() - start
        finally:
            ray.shutdown()
        rows = {row_key(r): {f: r.get(f) for f in COMPARED} for r in run.rows}
        identical[label] = rows == reference
    print(f"\n{n_samples} samples x {len(config.cells())} cells, {len(local.rows)} rows")
    print("| run | wall s | s / sample | vs local | rows identical |\n|---|---:|---:|---:|---|")
    base = timings["local (1 thread)"]
    for label, wall in timings.items():
        same = identical.get(label, True)
        verdict = "yes" if same else "NO"
        print(f"| {label} | {wall:.1f} | {wall / n_samples:.2f} | {base / wall:.2f}x | {verdict} |")


if __name__ == "__main__":
    main()
