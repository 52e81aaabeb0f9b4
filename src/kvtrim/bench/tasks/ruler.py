"""RULER's tracing and aggregation tasks (vt, cwe, fwe) and the classic passkey probe.

Templates are RULER's, word for word (including its "assgined" typo), so scores stay comparable
with published RULER numbers.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import replace
from typing import Any

from kvtrim.bench.tasks import haystacks as hs
from kvtrim.bench.tasks.sample import Builder, Sample, count_tokens, fit_size, sample_rng
from kvtrim.core.errors import KVTrimError

# --- vt: variable tracking -------------------------------------------------------------------
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_HOPS = 4  # one chain of 5 variables
VT_EXAMPLE_TOKENS = 500  # RULER sizes its one-shot example to 500 tokens


def _vt_prompt(task: str, rng: random.Random, n: int, name_len: int) -> tuple[Sample, list[str]]:
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = hs.random_letters(rng, name_len)
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_HOPS)]
    slots = hs.positions(rng, n + 1, len(chain))  # sorted: the chain keeps its order
    body = "\n".join(hs.interleave([hs.NOISE] * n, list(zip(slots, chain, strict=True))))
    sample = Sample(
        task=task,
        context=f"{VT_INSTRUCTION}\n\n{body}",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, "
        f"{VT_HOPS + 1} variables are assgined the value {value}, they are: ",
        references=names,
        metric="string_match_all",
        max_new_tokens=30,
        metadata={"value": value},
    )
    return sample, names


def vt_builder(task: str, tokenizer: Any, seed: int) -> Builder:
    """The worked example (3-letter names, ~500 tokens) is made once per call, as RULER does."""

    def example(n: int) -> tuple[Sample, list[str]]:
        return _vt_prompt(task, sample_rng(task, seed, -1), n, name_len=3)

    def example_tokens(n: int) -> int:
        sample, names = example(n)
        return count_tokens(tokenizer, f"{sample.prompt()} {' '.join(names)}")

    try:
        n_example = fit_size(example_tokens, VT_EXAMPLE_TOKENS, lo=0)
    except KVTrimError:  # a tokenizer so fine that even the bare example is longer: keep it bare
        n_example = 0
    shot, shot_names = example(n_example)
    shot_text = f"{shot.prompt()} {' '.join(shot_names)}"

    def build(rng: random.Random, n: int) -> Sample:
        sample, _ = _vt_prompt(task, rng, n, name_len=5)
        return replace(sample, context=f"{shot_text}\n\n{sample.context}")

    return build


# --- cwe: common words extraction --------------------------------------------------------------
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))  # "1. apple 2. run ..."


def cwe_builder(task: str, length: int) -> Builder:
    """Size unit: distinct words; the 10 common ones repeat 30×, each rarer one 3×, so longer
    prompts hold more rare words. Below 4096 tokens RULER uses 6×/1× (and a smaller example)."""
    short = length < 4096
    ex_words, ex_common, ex_rare = (20, 3, 1) if short else (40, 10, 3)
    freq_common, freq_rare = (6, 1) if short else (30, 3)
    pool = hs.common_word_pool()

    def word_list(rng: random.Random, words: list[str], common: int, rare: int) -> str:
        items = words[:CWE_COMMON] * common + words[CWE_COMMON:] * rare
        rng.shuffle(items)
        return _numbered(items)

    def build(rng: random.Random, n: int) -> Sample:
        shot = rng.sample(pool, ex_words)
        order = list(pool)
        random.Random(rng.getrandbits(64)).shuffle(order)  # the first n: same prefix whatever n is
        words = order[:n]
        shot_text = (
            f"{CWE_INTRO}\n{word_list(rng, shot, ex_common, ex_rare)}\n{CWE_QUESTION}{CWE_PREFIX} "
            + _numbered(shot[:CWE_COMMON])
        )
        return Sample(
            task=task,
            context=f"{shot_text}\n{CWE_INTRO}\n{word_list(rng, words, freq_common, freq_rare)}",
            question=CWE_QUESTION,
            answer_prefix=CWE_PREFIX,
            references=words[:CWE_COMMON],
            metric="string_match_all",
            max_new_tokens=120,
            metadata={"freq_common": freq_common, "freq_rare": freq_rare, "n_words": n},
        )

    return build


def cwe_size_range() -> tuple[int, int]:
    return CWE_COMMON, len(hs.common_word_pool())


# --- fwe: frequent words extraction ------------------------------------------------------------
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ALPHA = 2.0
ZETA_2 = math.pi**2 / 6  # ζ(α) for α = 2: normalises the Zipf counts


def fwe_builder(task: str, length: int) -> Builder:
    """Size unit: the nominal word count N; the word of rank k appears ⌊N·k^-α/ζ(α)⌋ times, rank 1
    is the '....' noise, ranks 2-4 are the answer. Vocabulary: length // 50 coded 6-letter words."""
    vocab_size = max(length // 50, 5)

    def build(rng: random.Random, n: int) -> Sample:
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add(hs.random_letters(rng, 6, string.ascii_lowercase))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # RULER: the top rank is noise
        counts = [int(n * (k**-FWE_ALPHA) / ZETA_2) for k in range(1, vocab_size + 1)]
        for k in (1, 2, 3):  # small N: keep the answers strictly above every other word
            counts[k] = max(counts[k], counts[4] + 1)
        text = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
        rng.shuffle(text)
        return Sample(
            task=task,
            context=f"{FWE_INTRO} {' '.join(text)}",
            question=FWE_QUESTION,
            answer_prefix=FWE_PREFIX,
            references=words[1:4],
            metric="string_match_all",
            max_new_tokens=50,
            metadata={"counts": dict(zip(words[1:4], counts[1:4], strict=True))},
        )

    return build


# --- passkey --------------------------------------------------------------------------------
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)


def passkey_builder(task: str, depth: float | None = None) -> Builder:
    """Noise sentences with "The pass key is {k}. Remember it. {k} is the pass key." at ``depth``
    (random when None); size unit: noise blocks."""

    def build(rng: random.Random, n: int) -> Sample:
        key = hs.random_number(rng, digits=5)
        slot = round(depth * n) if depth is not None else rng.randint(0, n)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        haystack = " ".join(hs.interleave([hs.NOISE] * n, [(slot, needle)]))
        return Sample(
            task=task,
            context=f"{PASSKEY_INTRO}\n{haystack}",
            question="What is the pass key?",
            answer_prefix=" The pass key is",
            references=[key],
            metric="string_match_all",
            max_new_tokens=16,
            metadata={"depth": slot / n if n else 0.0},
        )

    return build
