"""``kvtrim demo``: answer the bundled questions from the full cache and from compressed ones.

With no compression named it shows the default compression next to the three seed methods in
their best configurations at ratio 0.5 (the RULER sweeps of docs/results.md) and the uncompressed
cache; with ``--method`` / ``--spec`` it shows that compression next to the uncompressed cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from typing import Any

from kvtrim.cli.common import add_compression_arguments, add_method_arguments, spec_from_args
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec

MIB = 1024 * 1024

#: the seed methods (kvtrim's own KNorm, Expected Attention, Q-Filters) in the configuration that
#: scored best for each at ratio 0.5 across both named models' RULER sweeps (docs/results.md)
SEED_BEST = ("knorm@0.5", "expected-attention:epsilon=0.01@0.5+adaptive", "qfilters@0.5")


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="answer questions about the bundled example document",
        description="Answer six questions about the bundled report (~3,000 tokens) from the full cache "
        "and from compressed ones. With no compression named: the default compression and the three "
        "seed methods in their best configurations at ratio 0.5 (--ratio changes it); with --method or "
        "--spec: that compression. Prints every answer, then one line per configuration with the facts "
        "found and the memory saved.",
    )
    add_method_arguments(demo)
    add_compression_arguments(demo)


def run(args: argparse.Namespace) -> int:
    from kvtrim.api import compress
    from kvtrim.models import load_model
    from kvtrim.scorers import make_scorer
    from kvtrim.strategies.planner import plan

    axes = (
        "spec",
        "method",
        "budget",
        "budget_tokens",
        "threshold",
        "chunk",
        "decode_budget",
        "key_channels",
        "evicted",
        "rerotate",
        "windows",
    )
    named = any(getattr(args, axis, None) is not None for axis in axes)
    specs = [spec_from_args(args)] if named else _showcase(CompressionSpec.default(args.ratio), args.ratio)
    for spec in specs:
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
    runs = [CompressionSpec("none", ratio=0.0)] + [spec for spec in specs if spec.method != "none"]
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
            print(f"  [{'ok' if found else '--'}] {_label(session, sessions):<44} {answer}")
        print()
    print(f"Context: {sessions[0].context_length} tokens. One line per configuration:")
    for session, hits in zip(sessions, correct, strict=True):
        _summary(session, sessions, hits, len(questions))
    return 0


def _showcase(default: CompressionSpec, ratio: float | None) -> list[CompressionSpec]:
    """The default compression, then each seed method's best configuration (at ``ratio`` if given)."""
    seeds = [CompressionSpec.parse(text) for text in SEED_BEST]
    if ratio is not None:
        seeds = [seed.with_(ratio=ratio) for seed in seeds]
    return [default] + [seed for seed in seeds if seed != default]


def _label(session: Any, sessions: list[Any]) -> str:
    label = str(session.spec)
    if len(sessions) > 2 and session.spec == CompressionSpec.default(session.spec.ratio):
        label += " (default)"
    return label


def _summary(session: Any, sessions: list[Any], hits: int, total: int) -> None:
    stats = session.stats
    print(
        f"  {_label(session, sessions):<52} {hits}/{total} facts  "
        f"KV {stats.kv_bytes_after / MIB:5.1f} of {stats.kv_bytes_before / MIB:.1f} MiB "
        f"({stats.bytes_saved / MIB:4.1f} MiB saved)  prefill {session.prefill_s:.2f} s, "
        f"compression {stats.compress_s:.3f} s"
    )


def _normalise(text: str) -> str:
    return text.lower().replace(",", "")
