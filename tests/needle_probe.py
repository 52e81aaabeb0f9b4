"""The single-needle probe both real-model integration suites hold their thresholds on.

One needle in ~2k tokens of noise haystack at 10 depths, the question never seen during
compression, answered greedily with room for every digit of the answer.
"""

from __future__ import annotations

from typing import Any

import kvtrim
from kvtrim.bench.tasks.needle import needle_sample

DEPTHS = [i / 9 for i in range(10)]


def needle_samples(tokenizer: Any) -> list:
    return [needle_sample(tokenizer, 2000, depth, seed=i) for i, depth in enumerate(DEPTHS)]


def needle_hits(
    model: Any, tokenizer: Any, samples: list, method: str, ratio: float, **options: Any
) -> list[int]:
    """1 where the compressed cache's answer contains the needle, per sample."""
    hits = []
    for sample in samples:
        session = kvtrim.compress(model, tokenizer, sample.context, method=method, ratio=ratio, **options)
        hits.append(int(sample.answer in session.ask(sample.question, max_new_tokens=32)))
    return hits
