"""``kvtrim bench``: a resumable benchmark sweep (tasks × methods × ratios × budgets)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrim.bench.tasks.registry import DEFAULT_GRID_DEPTHS
from kvtrim.cli.common import MODEL_HELP, csv, depth, existing_file, model_label, positive, ratio
from kvtrim.core.errors import KVTrimError

if TYPE_CHECKING:
    from kvtrim.bench.config import BenchConfig

BENCH_EPILOG = """\
Each context is prefilled once and every (method, ratio, budget) cell is derived from that
prefill (bit-identical to compressing it alone); query-aware methods (snapkv-query-aware, finch) get a
prefill of their own with the question. Ratio 0 and method 'none' are one cell ('none'),
evaluated once per sample. Reports label non-uniform budgets as METHOD+BUDGET. Rows stream
to OUT/results.jsonl; rerun the same command to resume an interrupted run (OUT/config.json
must match). Then: kvtrim report OUT.

examples:
  kvtrim bench --tasks ruler --length 4096 --samples 20 \\
      --methods knorm,expected-attention,qfilters --ratios 0,0.25,0.5,0.75 --out results/ruler-4k
  kvtrim bench --tasks ruler --length 2048 --methods snapkv,snapkv-query-aware \
      --budgets uniform,adaptive,pyramid --ratios 0,0.5 --out results/budgets
  kvtrim bench --tasks niah_single_1,vt,perplexity --length 2048 --samples 5 --out results/quick
  kvtrim bench --tasks needle_grid --grid-lengths 1024,2048,4096 --out results/grid
  kvtrim bench --dataset ruler --data ~/ruler/4096 --tasks ruler --length 4096 --out results/ruler-hf
  kvtrim bench --dataset longbench --data ~/LongBench/data --tasks hotpotqa,musique --length 8192 ...
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark sweep (tasks x methods x ratios), resumable",
        description="Score compression methods on benchmark tasks at several compression ratios.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sweep_arguments(bench)
    _add_run_arguments(bench)
    _add_ray_arguments(bench)
    _add_data_arguments(bench)


def _add_ray_arguments(bench: argparse.ArgumentParser) -> None:
    """Where the samples run: here, or on Ray actors (``pip install 'kvtrim[ray]'``)."""
    bench.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the samples on Ray actors: no value starts a local Ray instance, 'auto' or an "
        "address (host:port) joins a running cluster; rows and resume are as in a local run",
    )
    bench.add_argument(
        "--ray-workers", type=positive, default=2, help="Ray actors, each loads the model once (default 2)"
    )
    bench.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs (and torch threads) per actor (default 1)",
    )
    bench.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default 0)")


def _add_sweep_arguments(bench: argparse.ArgumentParser) -> None:
    """What is swept: tasks, methods, ratios, budgets, and the prompts' size."""
    bench.add_argument("--out", required=True, help="result folder (created; rerun to resume)")
    bench.add_argument("--model", default=None, help=MODEL_HELP)
    bench.add_argument(
        "--tasks",
        default="ruler",
        help="comma-separated tasks or groups: ruler, niah, niah_single_1, vt, cwe, fwe, qa_1, qa_2, "
        "passkey, needle_grid, perplexity (default: ruler); with --dataset, the data's task names",
    )
    bench.add_argument("--length", type=positive, default=4096, help="tokens per prompt (default 4096)")
    bench.add_argument("--samples", type=positive, default=10, help="samples per task (default 10)")
    bench.add_argument(
        "--methods",
        type=csv(str),
        default=["knorm", "expected-attention", "qfilters"],
        help="comma-separated methods, each with options if wanted (name:key=value, e.g. "
        "expected-attention:epsilon=0.01) (default: knorm,expected-attention,qfilters)",
    )
    bench.add_argument(
        "--ratios",
        type=csv(ratio),
        default=[0.0, 0.25, 0.5, 0.75],
        help="comma-separated ratios in [0, 1) (default: 0,0.25,0.5,0.75)",
    )
    bench.add_argument(
        "--budgets",
        type=csv(str),
        default=["uniform"],
        help="comma-separated budgets, each swept with every method and ratio: uniform, pyramid, "
        "adaptive, duo, options as for methods (adaptive:alpha=0.1) (default: uniform)",
    )


def _add_run_arguments(bench: argparse.ArgumentParser) -> None:
    """How the cells are answered."""
    bench.add_argument("--seed", type=int, default=0, help="task generation and method seed (default 0)")
    bench.add_argument(
        "--max-new-tokens", type=positive, default=None, help="cap on each task's own answer budget"
    )
    bench.add_argument(
        "--no-answer-prefix", action="store_true", help="do not continue the task's answer prefix"
    )
    bench.add_argument("--no-chat-template", action="store_true", help="plain Question/Answer layout")
    bench.add_argument(
        "--no-share",
        action="store_true",
        help="prefill every cell separately (same results, slower; for checking)",
    )
    bench.add_argument(
        "--windows",
        action="store_true",
        help="every cell compresses sliding-window layers too, within their window (Gemma 3; "
        "each cell is then prefilled alone)",
    )
    bench.add_argument(
        "--batch-size",
        type=positive,
        default=1,
        help="answer up to N samples of a task in one left-padded batch (uniform/tokens budgets; default 1)",
    )
    bench.add_argument(
        "--cell-batch",
        type=positive,
        default=1,
        help="answer up to N cells (method x ratio x budget) of a sample in one batch: same rows up "
        "to float rounding, 2-3x faster on a CPU (default 1: one by one)",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_data_arguments(bench: argparse.ArgumentParser) -> None:
    """Where the tasks' text comes from, and the needle-grid and perplexity tasks' sizes."""
    bench.add_argument("--haystack", default=None, help="prose file replacing the bundled essays")
    bench.add_argument("--squad", default=None, help="SQuAD v2.0 dev file (dev-v2.0.json) for qa_1")
    bench.add_argument(
        "--hotpotqa", default=None, help="HotpotQA dev distractor file (hotpot_dev_distractor_v1.json), qa_2"
    )
    bench.add_argument(
        "--dataset",
        choices=("generated", "ruler", "longbench"),
        default="generated",
        help="generated tasks (default) or published data: RULER or LongBench, read by `datasets`",
    )
    bench.add_argument(
        "--data",
        default=None,
        help="local path (file or folder) or hub id of --dataset, read from the HF cache only "
        "(default: simonjegou/ruler or THUDM/LongBench)",
    )
    bench.add_argument(
        "--grid-lengths", type=csv(positive), default=None, help="needle_grid lengths (default: --length)"
    )
    bench.add_argument(
        "--grid-depths",
        type=csv(depth),
        default=list(DEFAULT_GRID_DEPTHS),
        help="needle_grid depths in [0, 1] (default: 0,0.25,0.5,0.75,1)",
    )
    bench.add_argument("--grid-samples", type=positive, default=1, help="needles per grid cell (default 1)")
    bench.add_argument(
        "--ppl-tokens",
        type=positive,
        default=256,
        help="perplexity: continuation tokens scored (default 256)",
    )
    bench.add_argument("--ppl-text", default=None, help="text for perplexity (default: the bundled essays)")


def run(args: argparse.Namespace) -> int:
    from kvtrim.bench.results import check_config
    from kvtrim.bench.run import run_bench
    from kvtrim.bench.samples import build_samples
    from kvtrim.bench.tables import summary_markdown
    from kvtrim.models import load_model

    config = _config(args)
    if config.windows and args.batch_size > 1:
        raise KVTrimError("--windows compresses every cell alone: drop --batch-size.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)  # refuse a mismatching folder before the model loads
    print(f"Loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})...", file=sys.stderr)
    model, tokenizer = load_model(args.model)
    samples = build_samples(config, tokenizer)
    n = sum(len(v) for v in samples.values())
    print(
        f"{n} samples x {len(config.cells())} cells -> {args.out}/results.jsonl", file=sys.stderr, flush=True
    )
    if args.ray is not None:
        summary = _run_on_ray(args, config, samples)
    else:
        summary = run_bench(
            model,
            tokenizer,
            config,
            args.out,
            share=not args.no_share,
            progress=not args.quiet,
            samples=samples,
            batch_size=args.batch_size,
            cell_batch=args.cell_batch,
        )
    print(summary_markdown(summary.rows, f"kvtrim bench — {Path(args.out).name}"))
    print(
        f"{summary.written} new rows, {summary.skipped} already done, in {summary.wall_s:.1f} s. "
        f"Plots: kvtrim report {args.out}",
        file=sys.stderr,
    )
    return 0


def _run_on_ray(args: argparse.Namespace, config: Any, samples: Any) -> Any:
    from kvtrim.bench.distributed import RayOptions, run_bench_on_ray

    if args.batch_size > 1:
        raise KVTrimError("--ray runs one sample per task of work: drop --batch-size (--cell-batch works).")
    options = RayOptions(
        address=args.ray,
        workers=args.ray_workers,
        cpus_per_worker=args.ray_cpus_per_worker,
        gpus_per_worker=args.ray_gpus_per_worker,
    )
    return run_bench_on_ray(
        args.model,
        config,
        args.out,
        samples,
        options,
        share=not args.no_share,
        cell_batch=args.cell_batch,
        progress=not args.quiet,
    )


def _config(args: argparse.Namespace) -> BenchConfig:
    """The run's configuration from the flags; paths resolved, so a resumed run recognises them."""
    from kvtrim.bench.config import BenchConfig, resolve_tasks

    files = (("qa_1", args.squad, "SQuAD file"), ("qa_2", args.hotpotqa, "HotpotQA file"))
    data_files = {task: found for task, path, what in files if (found := existing_file(path, what))}
    data = args.data
    if data is not None and Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    return BenchConfig(
        tasks=resolve_tasks(args.tasks, args.dataset, data_files),
        methods=args.methods,
        ratios=args.ratios,
        budgets=args.budgets,
        length=args.length,
        samples=args.samples,
        seed=args.seed,
        model=model_label(args.model),
        dataset=args.dataset,
        data=data,
        max_new_tokens=args.max_new_tokens,
        answer_prefix=not args.no_answer_prefix,
        chat_template=False if args.no_chat_template else None,
        haystack_file=existing_file(args.haystack, "Haystack file"),
        data_files=data_files,
        grid_lengths=args.grid_lengths or [],
        grid_depths=args.grid_depths,
        grid_samples=args.grid_samples,
        ppl_tokens=args.ppl_tokens,
        ppl_text=existing_file(args.ppl_text, "Perplexity text"),
        windows=args.windows,
    )
