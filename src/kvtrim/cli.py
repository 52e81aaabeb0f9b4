"""The ``kvtrim`` command line: ask questions about a compressed document, list methods, calibrate.

Errors a user can cause print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
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
    ask.add_argument("--no-chat-template", action="store_true", help="plain Question/Answer layout")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    sub.add_parser("methods", help="list the compression methods")

    demo = sub.add_parser("demo", help="answer questions about the bundled example document")
    demo.add_argument("--method", default="expected-attention", help=f"one of: {', '.join(METHODS)}")
    demo.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of the KV cache evicted, in [0, 1)")
    demo.add_argument(
        "--model", default=None, help="hub id, local directory or .gguf (default: embedded SmolLM2)"
    )

    cal = sub.add_parser("calibrate", help="compute and cache Q-Filters for a model, from local text")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return _methods()
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "demo":
            return _demo(args)
        return _ask(args)
    except KVTrimError as err:
        print(f"kvtrim: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _methods() -> int:
    from kvtrim.methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, cls in METHODS.items():
        print(f"{name:<{width}}  {cls.summary}  [{cls.paper}]")
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
    make_scorer(args.method)  # fail on an unknown method before loading the model
    model, tokenizer = kvtrim.load_model(args.model)
    session = kvtrim.compress(
        model,
        tokenizer,
        context,
        method=args.method,
        ratio=args.ratio,
        use_chat_template=False if args.no_chat_template else None,
    )
    start = time.perf_counter()
    answers = [session.answer(q, max_new_tokens=args.max_new_tokens) for q in args.question]
    answer_s = time.perf_counter() - start
    stats = session.stats
    if args.json:
        print(
            json.dumps(
                {
                    "method": session.method,
                    "ratio": session.ratio,
                    "context_tokens": session.context_length,
                    "answers": [{"question": a.question, "answer": a.text} for a in answers],
                    "kv_tokens_before": stats.kv_tokens_before,
                    "kv_tokens_after": stats.kv_tokens_after,
                    "kv_bytes_before": stats.kv_bytes_before,
                    "kv_bytes_after": stats.kv_bytes_after,
                    "prefill_s": round(session.prefill_s, 4),
                    "compress_s": round(stats.compress_s, 4),
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
    print(
        f"prefill {session.prefill_s:.2f} s, compression {stats.compress_s:.3f} s, answers {answer_s:.2f} s"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Answer the bundled questions from the full cache and from the compressed one, side by side."""
    from importlib import resources

    import kvtrim
    from kvtrim.methods import make_scorer

    data = resources.files("kvtrim") / "data"
    document = (data / "example.md").read_text(encoding="utf-8")
    questions = json.loads((data / "example_questions.json").read_text(encoding="utf-8"))
    make_scorer(args.method)
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
    from kvtrim.calibration import load_or_compute_qfilters, qfilters_path

    texts = [_read_context(path) for path in args.text] if args.text else None
    model, tokenizer = kvtrim.load_model(args.model)
    filters = load_or_compute_qfilters(
        model, tokenizer, texts=texts, refresh=True, n_sequences=args.sequences, seq_len=args.length
    )
    print(f"Q-Filters {tuple(filters.shape)} saved to {qfilters_path(model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
