"""Single-needle probe (RULER ``niah_single_1`` layout): one 7-digit number hidden in a noise
haystack at a chosen depth, sized to a target length in the model's own tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_ADJECTIVES = (
    "lazy",
    "bright",
    "silent",
    "brave",
    "golden",
    "frozen",
    "gentle",
    "hidden",
    "noisy",
    "quick",
)
KEY_NOUNS = ("ocean", "forest", "lantern", "river", "meadow", "canyon", "harbor", "comet", "garden", "island")
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)


@dataclass(frozen=True)
class NeedleSample:
    context: str
    question: str
    answer: str
    depth: float


def needle_sample(tokenizer: Any, n_tokens: int, depth: float, seed: int = 0) -> NeedleSample:
    """A haystack of about ``n_tokens`` tokens with the needle at ``depth`` (0 = start, 1 = end)."""
    rng = random.Random(seed)
    key = f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = f"One of the special magic numbers for {key} is: {value}. "
    question = f"What is the special magic number for {key} mentioned in the provided text?"

    def build(repeats: int) -> str:
        sentences = (NOISE * repeats).split(". ")
        cut = round(depth * (len(sentences) - 1))
        sentences.insert(cut, needle.rstrip(". "))
        return INTRO + ". ".join(sentences)

    def length(repeats: int) -> int:
        return len(tokenizer(build(repeats), add_special_tokens=False)["input_ids"])

    low, high = 1, 2
    while length(high) < n_tokens:
        low, high = high, high * 2
    while low < high:  # largest repeat count whose context fits n_tokens
        mid = (low + high + 1) // 2
        low, high = (mid, high) if length(mid) <= n_tokens else (low, mid - 1)
    return NeedleSample(context=build(low), question=question, answer=value, depth=depth)
