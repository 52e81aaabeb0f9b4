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
from typing import Any

import torch
import torch.nn.functional as F

from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.core.errors import KVTrimError
from kvtrim.models.forward import forward
from kvtrim.models.prompting import encode
from kvtrim.sessions import Session
from kvtrim.strategies.shared_prefill import prefill_once


@torch.inference_mode()
def continuation_nll(session: Session, continuation_ids: list[int]) -> tuple[float, int]:
    """(sum of NLL in nats, number of tokens scored) of ``continuation_ids[1:]`` after the session's
    cache; the cache is restored afterwards."""
    if len(continuation_ids) < 2:
        raise KVTrimError("The continuation needs at least 2 tokens.")
    ids = torch.tensor([continuation_ids])  # (1, n)
    start = session.first_position
    positions = torch.arange(start, start + ids.shape[1])[None]  # (1, n)
    snapshot = CacheSnapshot.take(session.cache)
    try:
        logits = forward(session.model, ids, positions, session.cache, logits_to_keep=0).logits
    finally:
        snapshot.restore(session.cache)
    logprobs = F.log_softmax(logits[0, :-1].float(), dim=-1)  # (n-1, V)
    nll = -logprobs.gather(-1, ids[0, 1:, None].to(logprobs.device)).sum()
    return float(nll), ids.shape[1] - 1


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
    shared = prefill_once(
        model, tokenizer, context, list(methods), list(ratios), use_chat_template=False, seed=seed
    )
    ids = encode(tokenizer, continuation)[:max_tokens]
    out = {}
    for method, ratio, _ in shared.cells():
        nll, n = continuation_nll(shared.session(method, ratio), ids)
        out[(method, ratio)] = math.exp(nll / n)
    return out
