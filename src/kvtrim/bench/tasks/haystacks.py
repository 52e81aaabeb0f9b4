"""Haystack text and random needle material for the synthetic tasks.

Word material comes from wonderwords' bundled lists, as in RULER, so keys look like
"lazy-ocean" and are drawn from millions of pairs. The essay haystack is the bundled prose (RULER's
Paul Graham essays are not redistributable) or any text file the user supplies.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

from kvtrim.core.errors import KVTrimError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's insertion depths for essay haystacks: 40 evenly spaced percentages.
DEPTHS = [round(100 * i / 39) for i in range(40)]


@cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' asset lists ("nounlist.txt", "adjectivelist.txt", "verblist.txt")."""
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


def adjectives() -> tuple[str, ...]:
    return wonderwords_list("adjectivelist.txt")


def nouns() -> tuple[str, ...]:
    return wonderwords_list("nounlist.txt")


@lru_cache(maxsize=1)
def common_word_pool() -> tuple[str, ...]:
    """cwe's vocabulary: nouns, adjectives and verbs, deduplicated and sorted (RULER's order)."""
    return tuple(sorted({*nouns(), *adjectives(), *wonderwords_list("verblist.txt")}))


def random_word_key(rng: random.Random) -> str:
    """An adjective-noun pair; drawing each half is the same distribution as RULER's full product
    list without building its millions of strings."""
    return f"{rng.choice(adjectives())}-{rng.choice(nouns())}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    """A needle key or value of ``kind`` ("numbers", "words" or "uuids")."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word_key(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle kind {kind!r}")


def random_letters(rng: random.Random, k: int, alphabet: str = string.ascii_uppercase) -> str:
    return "".join(rng.choices(alphabet, k=k))


@lru_cache(maxsize=4)
def essay_words(haystack_file: str | None = None) -> tuple[str, ...]:
    """The essay haystack as whitespace-separated words (RULER's size unit for essays)."""
    if haystack_file is None:
        text = resources.files("kvtrim.data").joinpath("essays.txt").read_text(encoding="utf-8")
    else:
        path = Path(haystack_file)
        if not path.is_file():
            raise KVTrimError(f"haystack file {path} does not exist; pass a UTF-8 text file.")
        text = path.read_text(encoding="utf-8")
    words = tuple(text.split())
    if not words:
        raise KVTrimError(f"haystack file {haystack_file} is empty; pass a file with prose in it.")
    return words


def essay_text(n_words: int, haystack_file: str | None = None) -> str:
    """The first ``n_words`` words of the essay, wrapping around when more are needed."""
    words = essay_words(haystack_file)
    repeats, rest = divmod(n_words, len(words))
    return " ".join(words * repeats + words[:rest])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """A light stand-in for nltk's sentence splitter: needles only need sentence boundaries."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def positions(rng: random.Random, n_slots: int, k: int) -> list[int]:
    """``k`` sorted insertion slots in ``range(n_slots)``, distinct while there are enough slots."""
    if k <= n_slots:
        return sorted(rng.sample(range(n_slots), k))
    return sorted(rng.choices(range(n_slots), k=k))


def interleave(blocks: list[str], inserts: list[tuple[int, str]]) -> list[str]:
    """``blocks`` with each ``(slot, text)`` placed before ``blocks[slot]`` (slot ``len(blocks)`` =
    at the end); inserts sharing a slot keep their given order."""
    slots: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    for slot, text in inserts:
        slots[slot].append(text)
    out: list[str] = []
    for i, block in enumerate(blocks):
        out.extend(slots[i])
        out.append(block)
    out.extend(slots[-1])
    return out
