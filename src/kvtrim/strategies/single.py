"""One context, compressed while it is prefilled (one shot, chunk by chunk, evicting while decoding)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtrim.engine.compressor import Compressor
from kvtrim.generation import prefill
from kvtrim.models.adapters import check_supported
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import PromptLayout, encode_context, question_tokens
from kvtrim.sessions.session import Session
from kvtrim.strategies.plan import Plan


@torch.inference_mode()
def compress_single(
    model: nn.Module,
    tokenizer: Any,
    context: str | PromptLayout,
    plan: Plan,
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
    question: str | None = None,
) -> Session:
    """Prefill ``context`` (then ``question``, query-aware) with the plan's schedule attached."""
    check_supported(model)
    layout, ids = encode_context(model, tokenizer, context, use_chat_template, question)
    n_question = question_tokens(tokenizer, layout, question) if plan.spec.chunk_size is None else 0
    compressor = Compressor(model, plan.schedule(len(ids)), seed=seed, question_tokens=n_question)
    plan.prepare(model, tokenizer)
    cache = new_cache(model)
    with compressor.attached():
        _, elapsed = prefill(model, cache, [ids], chunk_size=plan.spec.chunk_size)
    stats = compressor.schedule.finish(cache, len(ids), compressor.stats)
    compressor.stats = stats
    evictor = compressor if plan.spec.decode_budget is not None else None  # attached while answering
    prefill_s = elapsed - stats.compress_s
    return plan.session(
        model, tokenizer, cache, layout, len(ids), stats, prefill_s, question=question, compressor=evictor
    )
