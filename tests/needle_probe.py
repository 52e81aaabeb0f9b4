"""The single-needle probe both real-model integration suites hold their thresholds on.

One needle in ~2k tokens of noise haystack at 10 depths, the question never seen during
compression, answered greedily with room for every digit of the answer.

Every configuration of a suite is answered from one shared prefill per sample
(:func:`kvtrim.strategies.shared_prefill.prefill_once`), as ``kvtrim bench`` does: its caches are
bit-identical to compressing with each configuration alone (``test_bench_runner``,
``test_cell_batch``), and the suites prefill each context once instead of once per configuration.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kvtrim
from kvtrim.bench.tasks.needle import needle_sample
from kvtrim.core.spec import Cell
from kvtrim.strategies.shared_prefill import prefill_once

DEPTHS = [i / 9 for i in range(10)]


def needle_samples(tokenizer: Any) -> list:
    return [needle_sample(tokenizer, 2000, depth, seed=i) for i, depth in enumerate(DEPTHS)]


def answer(session: kvtrim.Session, sample: Any) -> str:
    """The session's greedy answer to the sample's question, with room for every digit."""
    return session.ask(sample.question, max_new_tokens=32)


def hits_of(samples: list, answers: list[str]) -> list[int]:
    """1 where the answer contains the sample's needle."""
    return [int(s.answer in a) for s, a in zip(samples, answers, strict=True)]


def needle_hits(
    model: Any, tokenizer: Any, samples: list, method: str, ratio: float, **options: Any
) -> list[int]:
    """1 where the cache ``compress`` leaves answers with the needle, per sample (one prefill each)."""
    answers = [
        answer(kvtrim.compress(model, tokenizer, s.context, method=method, ratio=ratio, **options), s)
        for s in samples
    ]
    return hits_of(samples, answers)


def shared_answers(model: Any, tokenizer: Any, samples: list, cells: Iterable[Cell]) -> dict[Cell, list[str]]:
    """Per cell, its cache's answer to each sample: one prefill per sample for all cells (methods
    with options as spec labels, e.g. ``expected-attention:epsilon=0.01``)."""
    cells = list(cells)
    methods = list(dict.fromkeys(c.method for c in cells))
    ratios = list(dict.fromkeys(c.ratio for c in cells))
    budgets = list(dict.fromkeys(c.budget for c in cells))
    answers: dict[Cell, list[str]] = {cell: [] for cell in cells}
    for sample in samples:
        prefill = prefill_once(model, tokenizer, sample.context, methods, ratios, budgets=budgets)
        for cell in cells:
            answers[cell].append(answer(prefill.session(*cell), sample))
    return answers
