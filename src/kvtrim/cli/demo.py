"""``kvtrim demo``: answer the bundled questions from the full cache and from the compressed one."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from typing import Any

from kvtrim.cli.common import add_compression_arguments, add_method_arguments, spec_from_args
from kvtrim.core.errors import KVTrimError

MIB = 1024 * 1024


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="answer questions about the bundled example document")
    add_method_arguments(demo)
    add_compression_arguments(demo)


def run(args: argparse.Namespace) -> int:
    from kvtrim.api import compress
    from kvtrim.core.spec import CompressionSpec
    from kvtrim.models import load_model
    from kvtrim.scorers import make_scorer
    from kvtrim.strategies.planner import plan

    spec = spec_from_args(args)
    if make_scorer(spec.method, **dict(spec.method_options)).query_aware or spec.query_aware:
        raise KVTrimError(
            f"The demo compresses the document once for all its questions; {spec.method!r} compresses "
            "each question with it: try it with `kvtrim ask FILE -q QUESTION --method ...`."
        )
    plan(spec)  # every combination error before the model loads
    data = resources.files("kvtrim") / "data"
    document = (data / "example.md").read_text(encoding="utf-8")
    questions = json.loads((data / "example_questions.json").read_text(encoding="utf-8"))
    print(f"Loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})...", file=sys.stderr)
    model, tokenizer = load_model(args.model)
    runs = [CompressionSpec("none", ratio=0.0)] + ([spec] if spec.method != "none" else [])
    sessions = []
    for run_spec in runs:
        print(f"Prefilling the example document with {run_spec}...", file=sys.stderr)
        sessions.append(compress(model, tokenizer, document, spec=run_spec))
    correct = [0] * len(sessions)
    for item in questions:
        print(f"Q: {item['question']}   (expected: {item['answer']})")
        for i, session in enumerate(sessions):
            answer = session.ask(item["question"], max_new_tokens=32)
            found = _normalise(item["answer"]) in _normalise(answer)
            correct[i] += found
            print(f"  [{'ok' if found else '--'}] {str(session.spec):<24} {answer}")
        print()
    print(f"Context: {sessions[0].context_length} tokens.")
    for session, hits in zip(sessions, correct, strict=True):
        _summary(session, hits, len(questions))
    return 0


def _summary(session: Any, hits: int, total: int) -> None:
    stats = session.stats
    print(
        f"{session.spec}: {hits}/{total} expected facts; "
        f"KV cache {stats.kv_bytes_after / MIB:.1f} MiB of {stats.kv_bytes_before / MIB:.1f} MiB "
        f"({stats.bytes_saved / MIB:.1f} MiB saved); prefill {session.prefill_s:.2f} s, "
        f"compression {stats.compress_s:.3f} s."
    )


def _normalise(text: str) -> str:
    return text.lower().replace(",", "")
