"""The ``kvtrim`` command line: ask questions about a compressed document, list methods, calibrate.

Errors a user can cause print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvtrim.errors import KVTrimError

EXIT_USAGE = 2


def _ratio(text: str) -> float:
    from kvtrim.budgets import check_ratio

    try:
        return check_ratio(text)
    except KVTrimError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with kvtrim's exit code for usage errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"kvtrim: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


CALIBRATIONS = ("qfilters", "query-stats", "duo-heads", "all")


def build_parser() -> argparse.ArgumentParser:
    from kvtrim.methods import METHODS

    parser = _Parser(prog="kvtrim", description="Compress the KV cache of a causal LM and answer from it.")
    from kvtrim import __version__

    parser.add_argument("--version", action="version", version=f"kvtrim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ask = sub.add_parser("ask", help="compress a document once, then answer questions about it")
    ask.add_argument("context_file", help="text file holding the context ('-' reads stdin)")
    ask.add_argument("-q", "--question", action="append", required=True, help="a question (repeatable)")
    ask.add_argument("--method", default="expected-attention", help=f"one of: {', '.join(METHODS)}")
    ask.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of the KV cache evicted, in [0, 1)")
    ask.add_argument(
        "--model", default=None, help="hub id, local directory or .gguf (default: embedded SmolLM2)"
    )
    ask.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens generated per answer")
    _add_budget_arguments(ask)
    ask.add_argument("--no-chat-template", action="store_true", help="plain Question/Answer layout")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    sub.add_parser("methods", help="list the compression methods")

    demo = sub.add_parser("demo", help="answer questions about the bundled example document")
    demo.add_argument("--method", default="expected-attention", help=f"one of: {', '.join(METHODS)}")
    demo.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of the KV cache evicted, in [0, 1)")
    demo.add_argument(
        "--model", default=None, help="hub id, local directory or .gguf (default: embedded SmolLM2)"
    )

    cal = sub.add_parser(
        "calibrate", help="compute and cache per-model calibration (Q-Filters, ...) from local text"
    )
    cal.add_argument(
        "--model", default=None, help="hub id, local directory or .gguf (default: embedded SmolLM2)"
    )
    cal.add_argument(
        "--text",
        action="append",
        default=None,
        help="calibration text file (repeatable; default: bundled prose)",
    )
    cal.add_argument("--sequences", type=_positive, default=20, help="number of calibration sequences")
    cal.add_argument("--length", type=_positive, default=2048, help="tokens per calibration sequence")
    cal.add_argument(
        "--what",
        choices=CALIBRATIONS,
        action="append",
        default=None,
        help="what to calibrate (repeatable; default: qfilters): "
        "qfilters, query-stats (expected-attention-calibrated), duo-heads (--budget duo) or all",
    )

    _add_bench_parser(sub)
    _add_report_parser(sub)
    return parser


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [p.strip() for p in text.split(",") if p.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [kind(p) for p in items]

    return parse


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a depth in [0, 1], got {text!r}") from err
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a depth in [0, 1], got {text!r}")
    return value


BENCH_EPILOG = """\
Each context is prefilled once and every (method, ratio, budget) cell is derived from that
prefill (bit-identical to compressing it alone); query-aware methods (snapkv-query-aware) get a
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


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from kvtrim.bench.runner import DEFAULT_GRID_DEPTHS

    bench = sub.add_parser(
        "bench",
        help="run a benchmark sweep (tasks x methods x ratios), resumable",
        description="Score compression methods on benchmark tasks at several compression ratios.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--out", required=True, help="result folder (created; rerun to resume)")
    bench.add_argument(
        "--model", default=None, help="hub id, local directory or .gguf (default: embedded SmolLM2)"
    )
    bench.add_argument(
        "--tasks",
        default="ruler",
        help="comma-separated tasks or groups: ruler, niah, niah_single_1, vt, cwe, fwe, qa_1, qa_2, "
        "passkey, needle_grid, perplexity (default: ruler); with --dataset, the data's task names",
    )
    bench.add_argument("--length", type=_positive, default=4096, help="tokens per prompt (default 4096)")
    bench.add_argument("--samples", type=_positive, default=10, help="samples per task (default 10)")
    bench.add_argument(
        "--methods",
        type=_csv(str),
        default=["knorm", "expected-attention", "qfilters"],
        help="comma-separated methods, each with options if wanted (name:key=value, e.g. "
        "expected-attention:epsilon=0.01) (default: knorm,expected-attention,qfilters)",
    )
    bench.add_argument(
        "--ratios",
        type=_csv(_ratio),
        default=[0.0, 0.25, 0.5, 0.75],
        help="comma-separated ratios in [0, 1) (default: 0,0.25,0.5,0.75)",
    )
    bench.add_argument(
        "--budgets",
        type=_csv(str),
        default=["uniform"],
        help="comma-separated budgets, each swept with every method and ratio: uniform, pyramid, "
        "adaptive, duo, options as for methods (adaptive:alpha=0.1) (default: uniform)",
    )
    bench.add_argument("--seed", type=int, default=0, help="task generation and method seed (default 0)")
    bench.add_argument(
        "--max-new-tokens", type=_positive, default=None, help="cap on each task's own answer budget"
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
        "--batch-size",
        type=_positive,
        default=1,
        help="answer up to N samples of a task in one left-padded batch (uniform/tokens budgets; default 1)",
    )
    bench.add_argument(
        "--cell-batch",
        type=_positive,
        default=1,
        help="answer up to N cells (method x ratio x budget) of a sample in one batch: same rows up "
        "to float rounding, 2-3x faster on a CPU (default 1: one by one)",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
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
        "--grid-lengths", type=_csv(_positive), default=None, help="needle_grid lengths (default: --length)"
    )
    bench.add_argument(
        "--grid-depths",
        type=_csv(_depth),
        default=list(DEFAULT_GRID_DEPTHS),
        help="needle_grid depths in [0, 1] (default: 0,0.25,0.5,0.75,1)",
    )
    bench.add_argument("--grid-samples", type=_positive, default=1, help="needles per grid cell (default 1)")
    bench.add_argument(
        "--ppl-tokens",
        type=_positive,
        default=256,
        help="perplexity: continuation tokens scored (default 256)",
    )
    bench.add_argument("--ppl-text", default=None, help="text for perplexity (default: the bundled essays)")


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="tables and plots of a bench folder, or the comparison of two",
        description="With one folder: print the markdown tables and write DIR/report.md, "
        "accuracy-vs-ratio plots (one per method) and a needle heat map (PNG). With two: compare them.",
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="a bench --out folder (two to compare)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument("--out", default=None, help="also write the comparison to this file")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return _methods()
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "report":
            return _report(args)
        return _ask(args)
    except KVTrimError as err:
        print(f"kvtrim: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    from kvtrim.budgets import BUDGETS

    parser.add_argument(
        "--budget",
        default=None,
        help=f"how many pairs each layer and head keeps: {', '.join(BUDGETS)}, options as name:key=value "
        "(default uniform; see `kvtrim methods`)",
    )
    parser.add_argument(
        "--budget-tokens",
        type=_positive,
        default=None,
        help="keep at most N pairs per layer and head (implies --budget tokens)",
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="keep pairs scoring >= TAU (implies --budget threshold)"
    )
    parser.add_argument(
        "--chunk",
        type=_positive,
        default=None,
        help="prefill N tokens at a time, compressing after each chunk (bounded memory)",
    )
    parser.add_argument(
        "--decode-budget",
        type=_positive,
        default=None,
        help="while answering, keep at most N pairs per layer and head, evicting with the same method",
    )
    parser.add_argument(
        "--evict-every",
        type=_positive,
        default=16,
        help="with --decode-budget: evict every K generated tokens (default 16)",
    )
    parser.add_argument(
        "--key-channels",
        type=float,
        default=0.0,
        metavar="R",
        help="also prune this fraction of every layer's key channels (ThinK), e.g. 0.5",
    )


def _budget_kwargs(args: argparse.Namespace) -> dict:
    """The compress() keywords that the budget flags ask for."""
    from kvtrim.budgets import make_budget
    from kvtrim.specs import parse_spec

    budget, options = args.budget, {}
    name = parse_spec(budget)[0] if budget else None
    if args.budget_tokens is not None:
        if name not in (None, "tokens"):
            raise KVTrimError("--budget-tokens goes with --budget tokens (or no --budget).")
        budget, options = "tokens", {"tokens": args.budget_tokens}
    if args.threshold is not None:
        if name not in (None, "threshold"):
            raise KVTrimError("--threshold goes with --budget threshold (or no --budget).")
        budget, options = "threshold", {"threshold": args.threshold}
    if budget in ("tokens", "threshold") and not options:
        raise KVTrimError(
            f"--budget {budget} needs --{'budget-tokens' if budget == 'tokens' else 'threshold'}."
        )
    make_budget(budget or "uniform", **options)  # an unknown budget or option fails before loading
    from kvtrim.channels import check_channel_ratio

    return {
        "budget": budget or "uniform",
        "budget_options": options,
        "chunk_size": args.chunk,
        "decode_budget": args.decode_budget,
        "evict_every": args.evict_every,
        "key_channels": check_channel_ratio(args.key_channels),
    }


def _methods() -> int:
    from kvtrim.budgets import BUDGETS
    from kvtrim.methods import METHODS

    width = max(len(name) for name in [*METHODS, *BUDGETS])
    print("Methods (--method): what to keep")
    for name, cls in METHODS.items():
        print(f"  {name:<{width}}  {cls.summary}  [{cls.paper}]")
    print("\nBudgets (--budget): how many pairs each layer and head keeps")
    for name, cls in BUDGETS.items():
        print(f"  {name:<{width}}  {cls.summary}  [{cls.paper}]")
    print("\nKey channels (--key-channels R): prune that fraction of each layer's key channels too")
    print("  ThinK: keep the channels with the largest query·key magnitude  [arXiv 2407.21018]")
    print("\nOptions ride on the name, name:key=value[:key=value...], wherever a method or budget is")
    print("named: e.g. expected-attention:epsilon=0.01, critical:base=knorm, adaptive:alpha=0.1.")
    return 0


def _read_context(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    file = Path(path)
    if not file.is_file():
        raise KVTrimError(f"Context file not found: {path}")
    return file.read_text(encoding="utf-8")


def _ask(args: argparse.Namespace) -> int:
    import kvtrim
    from kvtrim.methods import make_scorer

    context = _read_context(args.context_file)
    query_aware = make_scorer(args.method).query_aware  # fails on an unknown method before loading
    budget = _budget_kwargs(args)
    model, tokenizer = kvtrim.load_model(args.model)

    def compress(question: str | None) -> kvtrim.Session:
        return kvtrim.compress(
            model,
            tokenizer,
            context,
            method=args.method,
            ratio=args.ratio,
            use_chat_template=False if args.no_chat_template else None,
            question=question,
            **budget,
        )

    answers = []
    if query_aware:  # the question is compressed with the context: one compression per question
        answer_s = prefill_s = compress_s = 0.0
        for question in args.question:
            session = compress(question)
            answers.append(session.answer(question, max_new_tokens=args.max_new_tokens))
            answer_s += answers[-1].answer_s
            prefill_s += session.prefill_s
            compress_s += session.stats.compress_s
    else:
        session = compress(None)
        prefill_s, compress_s = session.prefill_s, session.stats.compress_s
        start = time.perf_counter()
        answers = [session.answer(q, max_new_tokens=args.max_new_tokens) for q in args.question]
        answer_s = time.perf_counter() - start
    stats = session.stats  # a query-aware run reports its last question's cache
    if args.json:
        print(
            json.dumps(
                {
                    "method": session.method,
                    "ratio": session.ratio,
                    "budget": budget["budget"],
                    "chunk_size": budget["chunk_size"],
                    "decode_budget": budget["decode_budget"],
                    "decode_evictions": stats.decode_evictions,
                    "query_aware": query_aware,
                    "key_channels": budget["key_channels"],
                    "context_tokens": session.context_length,
                    "answers": [{"question": a.question, "answer": a.text} for a in answers],
                    "kv_tokens_before": stats.kv_tokens_before,
                    "kv_tokens_after": stats.kv_tokens_after,
                    "kv_bytes_before": stats.kv_bytes_before,
                    "kv_bytes_after": stats.kv_bytes_after,
                    "kv_bytes_peak": stats.kv_bytes_peak,
                    "prefill_s": round(prefill_s, 4),
                    "compress_s": round(compress_s, 4),
                    "answer_s": round(answer_s, 4),
                },
                indent=2,
            )
        )
        return 0
    for answer in answers:
        print(f"Q: {answer.question}\nA: {answer.text}\n")
    mib = 1024 * 1024
    saved = stats.bytes_saved / stats.kv_bytes_before * 100 if stats.kv_bytes_before else 0.0
    print(f"method {session.method}, ratio {session.ratio:g}, context {session.context_length} tokens")
    print(
        f"KV cache: {stats.kv_bytes_before / mib:.1f} MiB -> {stats.kv_bytes_after / mib:.1f} MiB "
        f"({saved:.0f}% saved)"
    )
    if query_aware:
        print(f"query-aware: the context was compressed with each question ({len(answers)} compressions)")
    print(f"prefill {prefill_s:.2f} s, compression {compress_s:.3f} s, answers {answer_s:.2f} s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Answer the bundled questions from the full cache and from the compressed one, side by side."""
    from importlib import resources

    import kvtrim
    from kvtrim.methods import make_scorer

    data = resources.files("kvtrim") / "data"
    document = (data / "example.md").read_text(encoding="utf-8")
    questions = json.loads((data / "example_questions.json").read_text(encoding="utf-8"))
    if make_scorer(args.method).query_aware:
        raise KVTrimError(
            f"The demo compresses the document once for all its questions; {args.method!r} compresses "
            "each question with it: try it with `kvtrim ask FILE -q QUESTION --method ...`."
        )
    print(f"Loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})...", file=sys.stderr)
    model, tokenizer = kvtrim.load_model(args.model)
    runs = [("none", 0.0), (args.method, args.ratio)] if args.method != "none" else [("none", 0.0)]
    sessions = []
    for method, ratio in runs:
        print(f"Prefilling the example document with {method} at ratio {ratio:g}...", file=sys.stderr)
        sessions.append(kvtrim.compress(model, tokenizer, document, method=method, ratio=ratio))
    correct = [0] * len(sessions)
    for item in questions:
        print(f"Q: {item['question']}   (expected: {item['answer']})")
        for i, session in enumerate(sessions):
            answer = session.ask(item["question"], max_new_tokens=32)
            found = _normalise(item["answer"]) in _normalise(answer)
            correct[i] += found
            label = f"{session.method} {session.ratio:g}"
            print(f"  [{'ok' if found else '--'}] {label:<24} {answer}")
        print()
    mib = 1024 * 1024
    print(f"Context: {sessions[0].context_length} tokens.")
    for session, hits in zip(sessions, correct, strict=True):
        stats = session.stats
        print(
            f"{session.method} at ratio {session.ratio:g}: {hits}/{len(questions)} expected facts; "
            f"KV cache {stats.kv_bytes_after / mib:.1f} MiB of {stats.kv_bytes_before / mib:.1f} MiB "
            f"({stats.bytes_saved / mib:.1f} MiB saved); prefill {session.prefill_s:.2f} s, "
            f"compression {stats.compress_s:.3f} s."
        )
    return 0


def _normalise(text: str) -> str:
    return text.lower().replace(",", "")


def _calibrate(args: argparse.Namespace) -> int:
    import kvtrim
    from kvtrim import calibration

    wanted = set(args.what or ["qfilters"])
    if "all" in wanted:
        wanted = set(CALIBRATIONS) - {"all"}
    texts = [_read_context(path) for path in args.text] if args.text else None
    model, tokenizer = kvtrim.load_model(args.model)
    sizes = dict(texts=texts, refresh=True, n_sequences=args.sequences, seq_len=args.length)
    if "qfilters" in wanted:
        filters = calibration.load_or_compute_qfilters(model, tokenizer, **sizes)
        print(f"Q-Filters {tuple(filters.shape)} saved to {calibration.qfilters_path(model)}")
    if "query-stats" in wanted:
        mean, _ = calibration.load_or_compute_query_stats(model, tokenizer, **sizes)
        print(f"Query statistics {tuple(mean.shape)} saved to {calibration.query_stats_path(model)}")
    if "duo-heads" in wanted:
        heads = calibration.load_or_compute_duo_heads(
            model, tokenizer, texts=texts, refresh=True, seq_len=args.length
        )
        print(f"Duo head split {tuple(heads.shape)} saved to {calibration.duo_heads_path(model)}")
    return 0


def _existing_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise KVTrimError(f"{what} not found: {path}")
    return str(file.resolve())


def _bench(args: argparse.Namespace) -> int:
    import kvtrim
    from kvtrim.bench.report import summary_markdown
    from kvtrim.bench.runner import BenchConfig, build_samples, check_config, resolve_tasks, run_bench

    data_files = {
        task: file
        for task, file in (
            ("qa_1", _existing_file(args.squad, "SQuAD file")),
            ("qa_2", _existing_file(args.hotpotqa, "HotpotQA file")),
        )
        if file
    }
    data = args.data
    if data is not None and Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    model_label = args.model or "embedded:SmolLM2-135M-Instruct"
    if args.model and Path(args.model).exists():
        model_label = str(Path(args.model).resolve())
    config = BenchConfig(
        tasks=resolve_tasks(args.tasks, args.dataset, data_files),
        methods=args.methods,
        ratios=args.ratios,
        budgets=args.budgets,
        length=args.length,
        samples=args.samples,
        seed=args.seed,
        model=model_label,
        dataset=args.dataset,
        data=data,
        max_new_tokens=args.max_new_tokens,
        answer_prefix=not args.no_answer_prefix,
        chat_template=False if args.no_chat_template else None,
        haystack_file=_existing_file(args.haystack, "Haystack file"),
        data_files=data_files,
        grid_lengths=args.grid_lengths or [],
        grid_depths=args.grid_depths,
        grid_samples=args.grid_samples,
        ppl_tokens=args.ppl_tokens,
        ppl_text=_existing_file(args.ppl_text, "Perplexity text"),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)  # refuse a mismatching folder before the model loads
    print(f"Loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})...", file=sys.stderr)
    model, tokenizer = kvtrim.load_model(args.model)
    samples = build_samples(config, tokenizer)
    n = sum(len(v) for v in samples.values())
    print(
        f"{n} samples x {len(config.cells())} cells -> {args.out}/results.jsonl", file=sys.stderr, flush=True
    )
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


def _report(args: argparse.Namespace) -> int:
    from kvtrim.bench.report import compare_dirs, write_report

    if len(args.dirs) > 2:
        raise KVTrimError("Give one bench folder (report) or two (comparison).")
    if len(args.dirs) == 2:
        text = compare_dirs(*args.dirs)
        print(text)
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
        return 0
    markdown, files = write_report(args.dirs[0], plots=not args.no_plots)
    print(markdown)
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
