"""One benchmark sample, and the length fitting every generator shares.

RULER sizes each prompt in the evaluated model's own tokenizer so that prompt + the tokens reserved
for the answer fit the target length; a prompt that looks right in characters can be 30% off in
tokens. Every generator therefore builds its text as a pure function of (per-sample seed, haystack
size) and lets :func:`fit_size` search the size.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from kvtrim.bench.tasks.metrics import METRICS, postprocess_prediction
from kvtrim.core.errors import KVTrimError


@dataclass(frozen=True)
class Sample:
    """A prompt split where kvtrim needs it: ``context`` is compressed, the rest never is.

    RULER's own prompt is ``context + separator + question + answer_prefix``; the model continues
    after the answer prefix. A runner that wraps the prompt in a chat template may put the answer
    prefix after the assistant tag instead (as RULER does with its model templates).
    """

    task: str
    context: str  # everything before the question: instructions, one-shot example, haystack
    question: str  # the question line(s), asked after the (compressed) context
    answer_prefix: str  # RULER's answer prefix ("" when the task has none)
    references: list[str]  # strings the metric looks for in the prediction
    metric: str  # "string_match_all" or "string_match_part"
    max_new_tokens: int  # RULER's reserved answer tokens, counted in the target length
    separator: str = "\n"  # between context and question in RULER's layout
    metadata: dict[str, Any] = field(default_factory=dict)  # length, prompt_tokens, seed, depth...

    def prompt(self) -> str:
        """The full RULER prompt, as one string."""
        return f"{self.context}{self.separator}{self.question}{self.answer_prefix}"

    def score(self, prediction: str) -> float:
        """This sample's metric on a raw model continuation, in [0, 100]."""
        return METRICS[self.metric](postprocess_prediction(prediction), self.references)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` without special tokens, as RULER's ``text_to_tokens`` counts them."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sample_rng(task: str, seed: int, index: int, salt: str = "") -> random.Random:
    """An independent, reproducible stream per (task, seed, sample): str seeds hash with SHA-512,
    so they are stable across processes (unlike ``hash()``), and one sample's draws never shift
    another's."""
    return random.Random(f"kvtrim:{task}:{seed}:{index}:{salt}")


def fit_size(
    measure: Callable[[int], int],
    budget: int,
    lo: int,
    hi: int | None = None,
    hint: int | None = None,
    what: str = "task",
) -> int:
    """Largest size ``n`` in ``[lo, hi]`` with ``measure(n) <= budget``.

    ``measure`` grows roughly with ``n`` (random distractors make it not strictly monotone), so the
    result is always a *measured* fit whose successor was measured too long: never above the budget,
    and at most one haystack unit below it. Gallops from ``hint`` (the previous sample's size), so a
    batch of samples costs a few tokenizer calls each instead of a full search.
    """
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n] <= budget

    if not fits(lo):
        raise KVTrimError(
            f"{what}: target length {budget} tokens is too short; the smallest prompt of this task "
            f"needs {cache[lo]} tokens (answer reserve included). Choose a larger length."
        )
    good, bad = lo, None  # good: fits; bad: measured too long (or past hi)
    if hint is not None and hint > lo and (hi is None or hint <= hi):
        if fits(hint):
            good = hint
        else:
            bad, step = hint, 1
            while bad - step > good and not fits(bad - step):  # gallop down
                bad, step = bad - step, step * 2
            if bad - step > good:  # the loop stopped on a size that fits
                good = bad - step
    if bad is None:
        step = 1
        while True:  # gallop up
            n = good + step
            if hi is not None and n > hi:
                bad = hi + 1
                break
            if not fits(n):
                bad = n
                break
            good, step = n, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


Builder = Callable[[random.Random, int], Sample]  # (per-sample rng, haystack size) -> sample


def generate_fitted(
    task: str,
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int,
    build: Builder,
    lo: int,
    hi: int | None = None,
    extra_tokens: int = 0,
    first_index: int = 0,
    hint: int | None = None,
) -> list[Sample]:
    """``n_samples`` samples, each sized so prompt + answer reserve + ``extra_tokens`` <= ``length``.

    ``build`` must be a pure function of its fresh rng and the size: the search rebuilds a sample
    many times and keeps the largest one that fits. ``extra_tokens`` lets a runner reserve room for
    what it adds around the prompt (chat template, BOS), which RULER counts too. ``first_index`` and
    ``hint`` let a caller that needs a different builder per sample generate them one at a time.
    """
    samples: list[Sample] = []
    for index in range(first_index, first_index + n_samples):
        sample, tokens, hint = _fit_one(
            tokenizer, build, sample_rng(task, seed, index), length, lo, hi, hint, extra_tokens, task
        )
        meta = {"length": length, "prompt_tokens": tokens, "seed": seed, "index": index, "size": hint}
        samples.append(replace(sample, metadata={**meta, **sample.metadata}))
    return samples


def _fit_one(
    tokenizer: Any,
    build: Builder,
    rng: random.Random,
    length: int,
    lo: int,
    hi: int | None,
    hint: int | None,
    extra_tokens: int,
    task: str,
) -> tuple[Sample, int, int]:
    """One sample at its fitted size, with its prompt tokens and the size."""
    state = rng.getstate()  # every build starts from the same draws
    built: dict[int, tuple[Sample, int]] = {}

    def make(n: int) -> tuple[Sample, int]:
        if n not in built:
            rng.setstate(state)
            sample = build(rng, n)
            built[n] = (sample, count_tokens(tokenizer, sample.prompt()))
        return built[n]

    def measure(n: int) -> int:
        sample, tokens = make(n)
        return tokens + sample.max_new_tokens + extra_tokens

    size = fit_size(measure, length, lo, hi, hint, what=task)
    sample, tokens = make(size)
    return sample, tokens, size
