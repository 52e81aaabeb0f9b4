"""The perplexity task's samples: (context, continuation) pairs cut from whole paragraphs of prose.

The runner scores them with :mod:`kvtrim.bench.continuation`: the continuation is read against the
compressed cache of the context.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from kvtrim.bench.tasks.sample import Sample, count_tokens, sample_rng
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import read_text
from kvtrim.models.prompting import encode

TASK = "perplexity"


def bundled_essays() -> str:
    return (resources.files("kvtrim") / "data" / "essays.txt").read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        raise KVTrimError("The perplexity text needs at least two paragraphs separated by blank lines.")
    return paragraphs


def perplexity_samples(
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int = 0,
    text_file: str | Path | None = None,
    continuation_tokens: int = 256,
    extra_tokens: int = 0,
) -> list[Sample]:
    """``n_samples`` (context, continuation) pairs cut from whole paragraphs of the text.

    Each sample starts at a seeded paragraph (the text wraps around); its context takes whole
    paragraphs while context + ``continuation_tokens`` + ``extra_tokens`` fit ``length`` tokens, and
    the continuation is the paragraphs after it (cut to ``continuation_tokens`` by the runner).
    The plain layout puts a blank line after the context, so the continuation follows it as in the
    text itself.
    """
    if continuation_tokens < 2:
        raise KVTrimError(f"The continuation needs at least 2 tokens, got {continuation_tokens}.")
    text = bundled_essays() if text_file is None else read_text(Path(text_file), "Perplexity text")
    paragraphs = _paragraphs(text)
    budget = length - continuation_tokens - extra_tokens
    samples = []
    for index in range(n_samples):
        start = sample_rng(TASK, seed, index).randrange(len(paragraphs))
        taken = _context_paragraphs(tokenizer, paragraphs, start, budget)
        if not taken[0]:
            raise KVTrimError(f"perplexity: a length of {length} tokens leaves no room for a context.")
        nxt = (start + len(taken)) % len(paragraphs)
        continuation: list[str] = []
        while count_tokens(tokenizer, "\n\n".join(continuation)) < continuation_tokens:
            continuation.append(paragraphs[(nxt + len(continuation)) % len(paragraphs)])
        metadata = {"length": length, "seed": seed, "index": index, "first_paragraph": start}
        metadata.update(continuation="\n\n".join(continuation), continuation_tokens=continuation_tokens)
        samples.append(
            Sample(
                task=TASK,
                context="\n\n".join(taken),
                question="",
                answer_prefix="",
                references=[],
                metric="perplexity",
                max_new_tokens=0,
                separator="\n\n",
                metadata=metadata,
            )
        )
    return samples


def _context_paragraphs(tokenizer: Any, paragraphs: list[str], start: int, budget: int) -> list[str]:
    """Whole paragraphs from ``start`` on (wrapping around) while they fit ``budget`` tokens; a first
    paragraph longer than the budget is cut to its first sentences that fit."""
    taken: list[str] = []
    for step in range(len(paragraphs)):
        candidate = paragraphs[(start + step) % len(paragraphs)]
        if count_tokens(tokenizer, "\n\n".join([*taken, candidate])) > budget:
            break
        taken.append(candidate)
    if not taken:
        words = paragraphs[start].split(" ")
        while words and count_tokens(tokenizer, " ".join(words)) > budget:
            words = words[: len(words) * 9 // 10]
        taken = [" ".join(words)]
    return taken


def continuation_ids(tokenizer: Any, sample: Sample) -> list[int]:
    return encode(tokenizer, sample.metadata["continuation"])[: sample.metadata["continuation_tokens"]]
