"""``kvtrim ask``: compress a document once, then answer questions about it."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from kvtrim.cli.common import (
    add_compression_arguments,
    add_method_arguments,
    positive,
    read_context,
    spec_from_args,
)
from kvtrim.core.errors import KVTrimError

MIB = 1024 * 1024


def add_parser(sub: argparse._SubParsersAction) -> None:
    ask = sub.add_parser("ask", help="compress a document once, then answer questions about it")
    ask.add_argument(
        "context_file", nargs="?", default=None, help="text file holding the context ('-' reads stdin)"
    )
    ask.add_argument("-q", "--question", action="append", required=True, help="a question (repeatable)")
    add_method_arguments(ask)
    ask.add_argument("--max-new-tokens", type=positive, default=64, help="tokens generated per answer")
    add_compression_arguments(ask)
    ask.add_argument("--no-chat-template", action="store_true", help="plain Question/Answer layout")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ask.add_argument("--save", metavar="DIR", help="also save the compressed session to this folder")
    ask.add_argument(
        "--load",
        metavar="DIR",
        help="answer from a session saved with --save instead of compressing a context "
        "(its own compression; the compression options are not used)",
    )


def run(args: argparse.Namespace) -> int:
    # the library (torch, transformers) loads here, so `kvtrim --help` answers at once
    from kvtrim.api import compress
    from kvtrim.models import load_model
    from kvtrim.scorers import make_scorer
    from kvtrim.strategies.planner import plan

    if (args.context_file is None) == (args.load is None):
        raise KVTrimError("Give a context file to compress, or --load DIR to answer from a saved session.")
    if args.load is not None:
        return _run_loaded(args)
    context = read_context(args.context_file)
    spec = spec_from_args(args)
    query_aware = spec.query_aware or make_scorer(spec.method, **dict(spec.method_options)).query_aware
    plan(spec.with_(query_aware=query_aware))  # every combination error before the model loads
    if query_aware and args.save:
        raise KVTrimError(
            "A query-aware method compresses once per question; --save needs one compressed context."
        )
    model, tokenizer = load_model(args.model)
    chat = False if args.no_chat_template else None

    def session_for(question: str | None) -> Any:
        return compress(model, tokenizer, context, spec=spec, use_chat_template=chat, question=question)

    if query_aware:  # the question is compressed with the context: one compression per question
        answers, answer_s, prefill_s, compress_s = [], 0.0, 0.0, 0.0
        for question in args.question:
            session = session_for(question)
            answers.append(session.answer(question, max_new_tokens=args.max_new_tokens))
            answer_s += answers[-1].answer_s
            prefill_s += session.prefill_s
            compress_s += session.stats.compress_s
    else:
        session = session_for(None)
        prefill_s, compress_s = session.prefill_s, session.stats.compress_s
        start = time.perf_counter()
        answers = [session.answer(q, max_new_tokens=args.max_new_tokens) for q in args.question]
        answer_s = time.perf_counter() - start
    if args.save:
        session.save(args.save)
    timings = {"prefill_s": prefill_s, "compress_s": compress_s, "answer_s": answer_s}
    _show(args, session, answers, timings, query_aware)
    return 0


def _run_loaded(args: argparse.Namespace) -> int:
    """Answer from a saved session: no prefill, no compression."""
    from kvtrim.models import load_model
    from kvtrim.sessions import load_session

    if args.save:
        raise KVTrimError("--load answers from a saved session; it is saved already (drop --save).")
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    session = load_session(model, tokenizer, args.load)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = [session.answer(q, max_new_tokens=args.max_new_tokens) for q in args.question]
    timings = {"prefill_s": 0.0, "compress_s": 0.0, "load_s": load_s, "answer_s": time.perf_counter() - start}
    _show(args, session, answers, timings, False)
    return 0


def _show(
    args: argparse.Namespace, session: Any, answers: list, timings: dict[str, float], query_aware: bool
) -> None:
    if args.json:
        print(json.dumps(_report(session, answers, timings, query_aware), indent=2))
    else:
        _print(session, answers, timings, query_aware)


def _report(session: Any, answers: list, timings: dict[str, float], query_aware: bool) -> dict[str, Any]:
    """The ``--json`` object (a query-aware run reports its last question's cache)."""
    stats, spec = session.stats, session.spec
    return {
        "spec": str(spec),
        "method": session.method,
        "ratio": session.ratio,
        "budget": spec.budget_label,
        "chunk_size": spec.chunk_size,
        "decode_budget": spec.decode_budget,
        "decode_evictions": stats.decode_evictions,
        "query_aware": query_aware,
        "key_channels": spec.key_channels,
        "context_tokens": session.context_length,
        "answers": [{"question": a.question, "answer": a.text} for a in answers],
        "kv_tokens_before": stats.kv_tokens_before,
        "kv_tokens_after": stats.kv_tokens_after,
        "kv_bytes_before": stats.kv_bytes_before,
        "kv_bytes_after": stats.kv_bytes_after,
        "kv_bytes_peak": stats.kv_bytes_peak,
        "kv_bytes_sliding": stats.kv_bytes_sliding,
        **{name: round(value, 4) for name, value in timings.items()},
    }


def _print(session: Any, answers: list, timings: dict[str, float], query_aware: bool) -> None:
    stats = session.stats
    for answer in answers:
        print(f"Q: {answer.question}\nA: {answer.text}\n")
    saved = stats.bytes_saved / stats.kv_bytes_before * 100 if stats.kv_bytes_before else 0.0
    print(f"method {session.method}, ratio {session.ratio:g}, context {session.context_length} tokens")
    print(f"spec {session.spec}")
    print(
        f"KV cache: {stats.kv_bytes_before / MIB:.1f} MiB -> {stats.kv_bytes_after / MIB:.1f} MiB "
        f"({saved:.0f}% saved)"
        + (
            f", of which sliding-window layers {stats.kv_bytes_sliding / MIB:.1f} MiB (kept whole)"
            if stats.kv_bytes_sliding
            else ""
        )
    )
    if query_aware:
        print(f"query-aware: the context was compressed with each question ({len(answers)} compressions)")
    if "load_s" in timings:
        print(f"loaded the saved session in {timings['load_s']:.2f} s, answers {timings['answer_s']:.2f} s")
        return
    print(
        f"prefill {timings['prefill_s']:.2f} s, compression {timings['compress_s']:.3f} s, "
        f"answers {timings['answer_s']:.2f} s"
    )
