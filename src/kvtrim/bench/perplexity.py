"""Language-modelling cost of compression: perplexity of a continuation read against the compressed
cache of the text before it.

The context is prefilled (and compressed) as usual; the continuation is then fed in one forward at
its true positions (teacher forcing) and the negative log-likelihood of each of its tokens is read
from the logits. The first continuation token is left out: its prediction comes from the prefill's
last position, which compression cannot change (each layer evicts only after its own attention ran),
so it would only dilute the difference between methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvtrim.bench.sample import Sample, count_tokens, sample_rng
from kvtrim.cache import CacheSnapshot
from kvtrim.errors import KVTrimError
from kvtrim.prompting import encode
from kvtrim.session import Session

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
    text = bundled_essays() if text_file is None else Path(text_file).read_text(encoding="utf-8")
    paragraphs = _paragraphs(text)
    budget = length - continuation_tokens - extra_tokens
    samples = []
    for index in range(n_samples):
        start = sample_rng(TASK, seed, index).randrange(len(paragraphs))
        taken: list[str] = []
        for step in range(len(paragraphs)):
            candidate = paragraphs[(start + step) % len(paragraphs)]
            if count_tokens(tokenizer, "\n\n".join([*taken, candidate])) > budget:
                break
            taken.append(candidate)
        if not taken:  # a paragraph longer than the budget: keep its first sentences that fit
            words = paragraphs[start].split(" ")
            while words and count_tokens(tokenizer, " ".join(words)) > budget:
                words = words[: len(words) * 9 // 10]
            taken = [" ".join(words)]
        if not taken[0]:
            raise KVTrimError(f"perplexity: a length of {length} tokens leaves no room for a context.")
        nxt = (start + len(taken)) % len(paragraphs)
        continuation: list[str] = []
        while count_tokens(tokenizer, "\n\n".join(continuation)) < continuation_tokens:
            continuation.append(paragraphs[(nxt + len(continuation)) % len(paragraphs)])
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
                metadata={
                    "length": length,
                    "seed": seed,
                    "index": index,
                    "first_paragraph": start,
                    "continuation": "\n\n".join(continuation),
                    "continuation_tokens": continuation_tokens,
                },
            )
        )
    return samples


@torch.inference_mode()
def continuation_nll(session: Session, continuation_ids: list[int]) -> tuple[float, int]:
    """(sum of NLL in nats, number of tokens scored) of ``continuation_ids[1:]`` after the session's
    cache; the cache is restored afterwards."""
    if len(continuation_ids) < 2:
        raise KVTrimError("The continuation needs at least 2 tokens.")
    model = session.model
    device = next(model.parameters()).device
    ids = torch.tensor([continuation_ids], device=device)  # (1, n)
    start = session.context_length
    positions = torch.arange(start, start + ids.shape[1], device=device)[None]  # (1, n)
    snapshot = CacheSnapshot.take(session.cache)
    try:
        logits = model(input_ids=ids, position_ids=positions, cache=session.cache, use_cache=True).logits
    finally:
        snapshot.restore(session.cache)
    logprobs = F.log_softmax(logits[0, :-1].float(), dim=-1)  # (n-1, V)
    nll = -logprobs.gather(-1, ids[0, 1:, None]).sum()
    return float(nll), ids.shape[1] - 1


def continuation_ids(tokenizer: Any, sample: Sample) -> list[int]:
    return encode(tokenizer, sample.metadata["continuation"])[: sample.metadata["continuation_tokens"]]


def perplexity(
    model: Any,
    tokenizer: Any,
    context: str,
    continuation: str,
    methods: Iterable[str],
    ratios: Iterable[float],
    *,
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict[tuple[str, float], float]:
    """Perplexity of ``continuation`` (its first ``max_tokens`` tokens) after ``context`` compressed
    with every (method, ratio), from one shared prefill (plain layout: no chat template)."""
    from kvtrim.shared_prefill import prefill_once

    shared = prefill_once(
        model, tokenizer, context, list(methods), list(ratios), use_chat_template=False, seed=seed
    )
    ids = encode(tokenizer, continuation)[:max_tokens]
    out = {}
    for method, ratio, _ in shared.cells():
        nll, n = continuation_nll(shared.session(method, ratio), ids)
        out[(method, ratio)] = math.exp(nll / n)
    return out
