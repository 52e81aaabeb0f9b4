"""Compress a context once, then answer any number of questions from the compressed cache.

Each question is appended after the compressed context with its *true* RoPE positions (the
context's length, not the shorter cache's), answered by greedy decoding, and the cache is then
restored to its compressed state, so every question sees exactly the same cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.budgets import Budget, TokenBudget, UniformBudget, check_ratio, make_budget, n_keep
from kvtrim.cache import CacheSnapshot, layer_bytes, layer_heads
from kvtrim.engine import CompressionStats, Compressor
from kvtrim.errors import KVTrimError
from kvtrim.methods import Scorer, make_scorer
from kvtrim.models import max_context, text_config
from kvtrim.prompting import PromptLayout, encode, layout_for


@dataclass
class Answer:
    """One answer, with the time it took to produce."""

    question: str
    text: str
    token_ids: list[int]
    answer_s: float


@dataclass
class Session:
    """A compressed context, ready for questions (build it with :func:`compress`)."""

    model: nn.Module
    tokenizer: Any
    cache: Any
    layout: PromptLayout
    context_length: int
    method: str
    ratio: float
    stats: CompressionStats
    prefill_s: float
    answers: list[Answer] = field(default_factory=list)

    def ask(self, question: str, max_new_tokens: int = 64, answer_prefix: str = "") -> str:
        """Answer ``question`` from the compressed cache (greedy decoding).

        ``answer_prefix`` is put after the prompt's end (after the assistant tag with a chat
        template) and the model continues it, as benchmarks like RULER do; it is not part of the
        returned text.
        """
        return self.answer(question, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix).text

    @torch.inference_mode()
    def answer(self, question: str, max_new_tokens: int = 64, answer_prefix: str = "") -> Answer:
        """Like :meth:`ask`, returning token ids and timing as well."""
        if not question.strip():
            raise KVTrimError("The question is empty.")
        if max_new_tokens < 1:
            raise KVTrimError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = encode(self.tokenizer, self.layout.question_text(question) + answer_prefix)
        limit = max_context(self.model)
        if self.context_length + len(ids) + max_new_tokens > limit:
            raise KVTrimError(
                f"Context ({self.context_length}) + question ({len(ids)}) + max_new_tokens "
                f"({max_new_tokens}) tokens exceed the model's window of {limit} tokens."
            )
        start = time.perf_counter()
        snapshot = CacheSnapshot.take(self.cache)
        try:
            generated = greedy_decode(
                self.model,
                self.cache,
                ids,
                self.context_length,
                max_new_tokens,
                stop_ids=stop_token_ids(self.model, self.tokenizer),
            )
        finally:
            snapshot.restore(self.cache)
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        result = Answer(question, text, generated, time.perf_counter() - start)
        self.answers.append(result)
        return result


def encode_context(
    model: nn.Module, tokenizer: Any, context: str, use_chat_template: bool | None
) -> tuple[PromptLayout, list[int]]:
    """Lay out and tokenize a context, refusing an empty one or one beyond the model's window."""
    if not context or not context.strip():
        raise KVTrimError("The context is empty: give some text to compress.")
    layout = layout_for(tokenizer, context, use_chat_template)
    ids = encode(tokenizer, layout.context_text, layout.add_special_tokens)
    limit = max_context(model)
    if len(ids) >= limit:
        raise KVTrimError(
            f"The context is {len(ids)} tokens long, longer than the model's window of {limit} tokens; "
            "shorten it or use a model with a longer context."
        )
    return layout, ids


def _chunked_budget(scorer: Scorer, policy: Budget, n_tokens: int, ratio: float, chunk_size: int) -> Budget:
    """Chunked prefill evicts down to the *final* budget after every chunk: a fixed token count."""
    if chunk_size < 1:
        raise KVTrimError(f"chunk_size must be >= 1, got {chunk_size}")
    if not scorer.chunkable:
        from kvtrim.methods import METHODS

        names = ", ".join(name for name, cls in METHODS.items() if cls.chunkable)
        raise KVTrimError(f"Method {scorer.name!r} does not support chunked prefill; these do: {names}.")
    if isinstance(policy, UniformBudget):
        return TokenBudget(n_keep(n_tokens, ratio))
    if isinstance(policy, TokenBudget):
        return policy
    raise KVTrimError("Chunked prefill works with the uniform and tokens budgets.")


def _final_stats(cache: Any, n_tokens: int, compress_s: float) -> CompressionStats:
    """Figures of a chunked compression: 'before' is the uncompressed cache of all n_tokens."""
    stats = CompressionStats(compress_s=compress_s)
    for layer in cache.layers:
        keys = layer.keys  # (B, Hkv, K, D)
        heads = layer_heads(layer)
        seq = keys.shape[2] if getattr(layer, "is_sliding", False) else n_tokens
        pair_bytes = 2 * keys.shape[-1] * keys.element_size()
        stats.add_layer(seq * heads * pair_bytes, layer_bytes(layer), seq, keys.shape[2], heads)
        stats.layers_compressed += 1
    return stats


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(x) for x in source)
    return ids


def greedy_decode(
    model: nn.Module,
    cache: Any,
    prompt_ids: list[int],
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[int]:
    """Feed ``prompt_ids`` at positions ``start_position…`` and decode greedily; returns new ids."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # (1, q)
    position = start_position
    generated: list[int] = []
    for _ in range(max_new_tokens):
        positions = torch.arange(position, position + ids.shape[1], device=device)[None]  # (1, q)
        logits = model(
            input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits
        position += ids.shape[1]
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        generated.append(token)
        ids = torch.tensor([[token]], device=device)
    return generated


@torch.inference_mode()
def compress(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    method: str | Scorer = "expected-attention",
    ratio: float = 0.5,
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
    budget: str | Budget = "uniform",
    budget_options: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    **options: Any,
) -> Session:
    """Prefill ``context`` once, compressing each layer as it goes, and return a :class:`Session`.

    ``method`` is a scorer name (see ``kvtrim methods``) or a ready scorer; ``options`` are the
    scorer's options (e.g. ``n_sink=4`` for expected-attention); ``ratio`` is the fraction of the
    cache evicted, in [0, 1). ``budget`` decides how many pairs each layer and head keeps:
    ``uniform`` (default), ``tokens`` (``budget_options={"tokens": N}``), ``pyramid``,
    ``adaptive`` (AdaKV, any scorer) or ``threshold`` (``budget_options={"threshold": tau}``).

    ``chunk_size=N`` prefills the context N tokens at a time and compresses after every chunk, so
    the cache never holds more than the final budget + N pairs per layer and head, whatever the
    context length. The final budget is ``T − floor(ratio·T)`` (or the token budget). Later
    chunks then attend to the compressed cache of earlier ones: results differ from one-shot
    compression, which sees the whole context before evicting.
    """
    from transformers import DynamicCache

    scorer = make_scorer(method, **options)
    layout, ids = encode_context(model, tokenizer, context, use_chat_template)
    policy = make_budget(budget, **(budget_options or {}))
    if chunk_size is not None:
        policy = _chunked_budget(scorer, policy, len(ids), check_ratio(ratio), chunk_size)
    compressor = Compressor(model, scorer, ratio, seed=seed, budget=policy)
    compressor.every_forward = chunk_size is not None
    scorer.setup(model, tokenizer)
    compressor.budget.setup(model, tokenizer)
    device = next(model.parameters()).device
    cache = DynamicCache(config=text_config(model))
    step = chunk_size or len(ids)
    start = time.perf_counter()
    with compressor.attached():
        for begin in range(0, len(ids), step):
            end = min(begin + step, len(ids))
            model(
                input_ids=torch.tensor([ids[begin:end]], device=device),  # (1, chunk)
                position_ids=torch.arange(begin, end, device=device)[None],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    if chunk_size is not None:
        peak = compressor.stats.kv_bytes_peak
        compressor.stats = _final_stats(cache, len(ids), compressor.stats.compress_s)
        compressor.stats.kv_bytes_peak = peak
    total = time.perf_counter() - start
    return Session(
        model=model,
        tokenizer=tokenizer,
        cache=cache,
        layout=layout,
        context_length=len(ids),
        method=scorer.name,
        ratio=compressor.ratio,
        stats=compressor.stats,
        prefill_s=total - compressor.stats.compress_s,
    )
