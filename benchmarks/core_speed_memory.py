"""What compression costs on the embedded model: per method, the scorer's own time and the whole
compression's (scoring, selection, the copy of the kept pairs) as fractions of the prefill, KV
bytes kept against (1 − ratio) × full, and what kvtrim's hooks cost against plain transformers on
the same input.

Targets: scoring ≤ 2% of the prefill for every scorer that needs no extra forward pass; with
method ``none``, prefill + decode within 2% of plain transformers. Not a test: it prints figures
measured in one run (``--out`` saves them as JSON). Run it alone on the machine, with
OMP_NUM_THREADS set.

    python benchmarks/core_speed_memory.py [--lengths 1024,2048,4096,8000] [--ratio 0.5]
        [--methods all] [--repeats 2] [--decode 32] [--shape llama-3.2-1b] [--out FILE]

``--shape`` times a randomly initialised model of published shapes instead of the loaded one
(keeping its tokenizer): scoring's share of a prefill depends on the model's widths, and the
embedded model is narrow (576 wide, 64 per head), so its shares are the largest of any model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from model_shapes import SHAPES, random_model  # benchmarks/ is on the path when a script here runs

import kvtrim
import kvtrim.core.hooks as hooks_module
from kvtrim.bench.tasks.needle import needle_sample
from kvtrim.core.clock import device_time
from kvtrim.generation import greedy_decode
from kvtrim.models.adapters import model_device
from kvtrim.models.prompting import encode
from kvtrim.scorers import SCORERS, make_scorer

MIB = 1024 * 1024


class TimedScorer:
    """A scorer whose scoring calls are timed (``score``, and ``score_reconstruction`` for the
    reconstruction scorers): the scorer's own work, without the selection and the copy of the
    kept pairs that the whole compression adds, nor a reconstruction scorer's extra forwards."""

    def __init__(self, method: str, device: torch.device | None = None):
        self.scorer = make_scorer(method)
        self.device = device  # a GPU's queued work is waited for at both ends of a call
        self.seconds = 0.0
        self._depth = 0  # score_reconstruction may call score: time the outer call only
        for name in ("score", "score_reconstruction"):
            setattr(self.scorer, name, self._timed(getattr(self.scorer, name)))

    def _timed(self, function):  # noqa: ANN001, ANN202
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = device_time(self.device)
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.seconds += device_time(self.device) - start

        return timed

    def run(self, model, tokenizer, context: str, ratio: float) -> tuple[kvtrim.Session, float]:
        self.seconds = 0.0
        session = kvtrim.compress(model, tokenizer, context, method=self.scorer, ratio=ratio)
        return session, self.seconds


SCORING_HEADER = (
    f"{'tokens':>6} {'method':<30} {'prefill s':>9} {'score s':>8} {'/prefill':>8} {'compr s':>8} "
    f"{'/prefill':>8} {'full MiB':>9} {'kept MiB':>9} {'kept/tgt':>8}"
)


def scoring_methods() -> list[str]:
    """Every scorer that needs no forward pass of its own (``none`` included, as the baseline)."""
    return [m for m, cls in SCORERS.items() if not (cls.needs_reconstruction or cls.query_aware)]


def scoring_rows(
    model, tokenizer, context: str, methods: list[str], ratio: float, repeats: int
) -> list[dict]:
    """Per method: the median prefill, scoring (the scorer alone) and compression (scoring,
    selection and the copy of the kept pairs) times over ``repeats`` runs, and the bytes."""
    rows = []
    device = model_device(model)
    for method in methods:
        timed = TimedScorer(method, device)
        runs = [timed.run(model, tokenizer, context, ratio) for _ in range(repeats)]
        sessions = [session for session, _ in runs]
        prefill = statistics.median(r.prefill_s for r in sessions)
        score = statistics.median(seconds for _, seconds in runs)
        compress = statistics.median(r.stats.compress_s for r in sessions)
        stats = sessions[-1].stats
        target = stats.kv_bytes_before * (1 - ratio) if method != "none" else stats.kv_bytes_before
        rows.append(
            dict(
                tokens=sessions[-1].context_length,
                method=method,
                ratio=ratio,
                prefill_s=prefill,
                score_s=score,
                score_fraction=score / prefill,
                compress_s=compress,
                compress_fraction=compress / prefill,
                kv_bytes_full=stats.kv_bytes_before,
                kv_bytes_kept=stats.kv_bytes_after,
                kept_vs_target=stats.kv_bytes_after / target,
            )
        )
        row = rows[-1]
        print(
            f"{row['tokens']:>6} {method:<30} {prefill:>9.2f} {score:>8.3f} {row['score_fraction']:>8.1%} "
            f"{compress:>8.3f} {row['compress_fraction']:>8.1%} "
            f"{stats.kv_bytes_before / MIB:>9.1f} {stats.kv_bytes_after / MIB:>9.1f} "
            f"{row['kept_vs_target']:>8.4f}",
            flush=True,
        )
    return rows


class CallbackClock:
    """Seconds spent inside kvtrim's hook callbacks: the hooks' own work, a figure free of the
    run-to-run noise that the wall-clock ratios carry (PyTorch's dispatch of the hooks not included)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("_on_projection", "_on_attention"):
            setattr(hooks_module, name, self._timed_factory(getattr(hooks_module, name)))

    def _timed_factory(self, factory):  # noqa: ANN001, ANN202
        def make(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            hook = factory(*args, **kwargs)

            def timed(*hook_args, **hook_kwargs):  # noqa: ANN002, ANN003, ANN202
                start = time.perf_counter()
                try:
                    return hook(*hook_args, **hook_kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            return timed

        return make


@torch.inference_mode()
def hooks_row(
    model, tokenizer, context: str, question: str, decode: int, repeats: int, clock: CallbackClock
) -> dict:
    """Wall time of the same prompt and the same number of new tokens: plain ``model.generate``,
    ``generate`` inside ``kvtrim.compressing(model, "none")`` (the hooks attached), and
    ``kvtrim.compress(method="none")`` + ``Session.answer`` — interleaved, medians of ``repeats``;
    and the time spent inside the hook callbacks during the hooked ``generate``."""
    session = kvtrim.compress(model, tokenizer, context, method="none", ratio=0.0)
    prompt = session.layout.context_text + session.layout.question_text(question)
    ids = tokenizer(prompt, add_special_tokens=session.layout.add_special_tokens, return_tensors="pt")[
        "input_ids"
    ]
    ids = ids.to(next(model.parameters()).device)
    options = dict(
        max_new_tokens=decode, min_new_tokens=decode, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    names = ("generate", "generate+hooks", "compress+answer", "callbacks")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        start = time.perf_counter()
        plain = model.generate(ids, **options)
        times["generate"].append(time.perf_counter() - start)
        clock.seconds = 0.0
        start = time.perf_counter()
        with kvtrim.compressing(model, "none", ratio=0.0):
            hooked = model.generate(ids, **options)
        times["generate+hooks"].append(time.perf_counter() - start)
        times["callbacks"].append(clock.seconds)
        assert torch.equal(plain, hooked), "the hooks changed generate's tokens"
        start = time.perf_counter()
        session = kvtrim.compress(model, tokenizer, context, method="none", ratio=0.0)
        tail = encode(tokenizer, session.layout.question_text(question))  # decode exactly ``decode`` tokens
        answer = greedy_decode(model, session.cache, tail, session.context_length, decode, stop_ids=set())
        times["compress+answer"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    row = dict(tokens=ids.shape[1], new_tokens=decode, answer_tokens=len(answer), **medians)
    ratio = {name: medians[name] / medians["generate"] for name in medians}
    print(
        f"{row['tokens']:>6} generate {medians['generate']:.2f} s | with hooks "
        f"{medians['generate+hooks']:.2f} s ({ratio['generate+hooks']:.3f}x; callbacks "
        f"{medians['callbacks'] * 1000:.0f} ms, {medians['callbacks'] / medians['generate+hooks']:.2%}) | "
        f"compress+answer {medians['compress+answer']:.2f} s "
        f"({ratio['compress+answer']:.3f}x, {row['answer_tokens']} tokens)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="1024,2048,4096,8000")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument(
        "--methods", default="all", help="comma-separated, or 'all' (every scorer but reconstruction ones)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the median is kept")
    parser.add_argument("--decode", type=int, default=32, help="new tokens in the hooks comparison")
    parser.add_argument("--model", default=None, help="the model (or, with --shape, only its tokenizer)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="time a randomly initialised model of these shapes instead (costs depend on shapes only)",
    )
    parser.add_argument(
        "--only", choices=("scoring", "hooks"), default=None, help="run one of the two tables"
    )
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    methods = scoring_methods() if args.methods == "all" else args.methods.split(",")
    model, tokenizer = kvtrim.load_model(args.model)
    if args.shape:
        config = SHAPES[args.shape](max(int(x) for x in args.lengths.split(",")) + 1024, len(tokenizer))
        model = random_model(config, model_device(model), next(model.parameters()).dtype)
        print(f"randomly initialised {args.shape} shapes, {args.model or 'the default model'}'s tokenizer")
    kvtrim.compress(model, tokenizer, "warm up " * 64, method="none", ratio=0.0)
    print(SCORING_HEADER)
    scoring, hooks = [], []
    samples = {n: needle_sample(tokenizer, n, depth=0.5) for n in (int(x) for x in args.lengths.split(","))}
    for sample in samples.values() if args.only != "hooks" else ():
        scoring += scoring_rows(model, tokenizer, sample.context, methods, args.ratio, args.repeats)
    print("\nHooks: the same prompt and new tokens, plain transformers against kvtrim with method none")
    clock = CallbackClock()
    for sample in samples.values() if args.only != "scoring" else ():
        hooks.append(
            hooks_row(model, tokenizer, sample.context, sample.question, args.decode, args.repeats + 1, clock)
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"scoring": scoring, "hooks": hooks, "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
