"""RULER's needle-in-a-haystack family (8 tasks), from one parametrised builder.

The variants differ only in haystack (noise / essay / lines of distractor needles), key and value
kinds, and how many keys, values per key and queried keys there are; see :data:`NIAH_CONFIGS`.
Distractor keys and values never equal (or, for word keys, contain) a real one, so each queried
key occurs exactly in its own needles and the question has one right answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvtrim.bench.tasks import haystacks as hs
from kvtrim.bench.tasks.sample import Builder, Sample

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise", "essay" or "needle"
    key_kind: str = "words"  # "words" or "uuids" (or "numbers")
    value_kind: str = "numbers"  # "numbers", "words" or "uuids"
    n_keys: int = 1  # needles with distinct keys (the rest are distractors)
    n_values: int = 1  # needles (values) per key
    n_queries: int = 1  # keys asked about at once


NIAH_CONFIGS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise"),
    "niah_single_2": NiahConfig("essay"),
    "niah_single_3": NiahConfig("essay", value_kind="uuids"),
    "niah_multikey_1": NiahConfig("essay", n_keys=4),
    "niah_multikey_2": NiahConfig("needle"),
    "niah_multikey_3": NiahConfig("needle", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": NiahConfig("essay", n_values=4),
    "niah_multiquery": NiahConfig("essay", n_keys=4, n_queries=4),
}


def _overlaps(a: str, b: str) -> bool:
    return a in b or b in a


def _draw(rng: random.Random, kind: str, avoid: Callable[[str], bool]) -> str:
    while True:
        value = hs.random_value(rng, kind)
        if not avoid(value):
            return value


def niah_builder(
    task: str, cfg: NiahConfig, haystack_file: str | None = None, depth: float | None = None
) -> Builder:
    """A builder for ``cfg``; ``depth`` in [0, 1] pins every needle there (needle grids), else
    depths are random as in RULER."""

    def build(rng: random.Random, n: int) -> Sample:
        keys, values, taken = _draw_needles(rng, cfg)
        needles = [(k, v) for k, vs in zip(keys, values, strict=True) for v in vs]
        rng.shuffle(needles)
        texts = [NEEDLE.format(kind=cfg.value_kind, key=k, value=v) for k, v in needles]
        asked = rng.sample(range(len(keys)), cfg.n_queries)
        hay_rng = random.Random(rng.getrandbits(64))  # distractors: same prefix whatever n is
        if cfg.haystack == "essay":
            haystack, depths = _essay_haystack(rng, n, texts, depth, haystack_file)
        else:
            blocks = _blocks(cfg, hay_rng, n, keys, taken)
            slots = (
                [round(depth * n)] * len(texts) if depth is not None else hs.positions(rng, n + 1, len(texts))
            )
            haystack = "\n".join(hs.interleave(blocks, list(zip(slots, texts, strict=True))))
            depths = [s / n if n else 0.0 for s in slots]
        queries = [keys[i] for i in asked]
        return _sample(task, cfg, haystack, queries, [v for i in asked for v in values[i]], depths, keys)

    return build


def _draw_needles(rng: random.Random, cfg: NiahConfig) -> tuple[list[str], list[list[str]], set[str]]:
    """Distinct keys, and ``n_values`` distinct values for each (all values distinct overall)."""
    keys: list[str] = []
    for _ in range(max(cfg.n_keys, cfg.n_queries)):
        keys.append(_draw(rng, cfg.key_kind, lambda k: any(_overlaps(k, o) for o in keys)))
    values: list[list[str]] = []
    taken: set[str] = set()
    for _ in keys:
        values.append([_draw(rng, cfg.value_kind, taken.__contains__) for _ in range(cfg.n_values)])
        taken.update(values[-1])
    return keys, values, taken


def _essay_haystack(
    rng: random.Random, n: int, texts: list[str], depth: float | None, haystack_file: str | None
) -> tuple[str, list[float]]:
    """``n`` words of essay with the needle sentences at RULER's depths (or all at ``depth``)."""
    sentences = hs.split_sentences(hs.essay_text(n, haystack_file))
    pct = [100 * depth] * len(texts) if depth is not None else sorted(rng.sample(hs.DEPTHS, len(texts)))
    slots = [int(len(sentences) * p / 100) for p in pct]
    haystack = " ".join(hs.interleave(sentences, list(zip(slots, texts, strict=True))))
    return haystack, [p / 100 for p in pct]


def _blocks(cfg: NiahConfig, hay_rng: random.Random, n: int, keys: list[str], taken: set[str]) -> list[str]:
    """``n`` haystack lines: the noise sentences, or distractor needles with their own keys."""
    if cfg.haystack == "noise":
        return [hs.NOISE] * n
    if cfg.haystack != "needle":
        raise ValueError(f"unknown haystack {cfg.haystack!r}")
    blocks = []
    for _ in range(n):
        key = _draw(hay_rng, cfg.key_kind, lambda k: any(_overlaps(k, o) for o in keys))
        value = _draw(hay_rng, cfg.value_kind, taken.__contains__)
        blocks.append(NEEDLE.format(kind=cfg.value_kind, key=key, value=value))
    return blocks


def _sample(
    task: str,
    cfg: NiahConfig,
    haystack: str,
    queries: list[str],
    references: list[str],
    depths: list[float],
    keys: list[str],
) -> Sample:
    """RULER's prompt around the haystack, worded for one answer or several."""
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    singular = cfg.n_queries * cfg.n_values == 1  # RULER words the prompt for one answer
    kind = cfg.value_kind[:-1] if singular else cfg.value_kind
    if singular:
        intro = f"A special magic {kind} is hidden within the following text."
        question = f"What is the special magic {kind} for {query} mentioned in the provided text?"
    else:
        intro = f"Some special magic {kind} are hidden within the following text."
        question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
    intro += f" Make sure to memorize it. I will quiz you about the {kind} afterwards."
    return Sample(
        task=task,
        context=f"{intro}\n{haystack}",
        question=question,
        answer_prefix=f" The special magic {kind} for {query} mentioned in the provided text "
        + ("is" if singular else "are"),
        references=references,
        metric="string_match_all",
        max_new_tokens=MAX_NEW_TOKENS,
        metadata={"depth": depths[0] if len(depths) == 1 else depths, "keys": keys, "query": queries},
    )
