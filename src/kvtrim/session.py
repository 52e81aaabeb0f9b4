"""Compress a context once, then answer any number of questions from the compressed cache.

Each question is appended after the compressed context with its *true* RoPE positions (the
context's length, not the shorter cache's), answered by greedy decoding, and the cache is then
restored to its compressed state, so every question sees exactly the same cache.

A query-aware compression (``compress(..., question=q)``) prefills the question right after the
context and compresses both together, as SnapKV's paper does: scorers then see the question while
choosing what to keep. Such a session answers that one question; only the end of the prompt (the
chat template's closing, the answer prefix) is appended after the compressed cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from kvtrim.budgets import (
    Budget,
    TokenBudget,
    UniformBudget,
    check_ratio,
    make_budget,
    n_keep,
)
from kvtrim.cache import CacheSnapshot, layer_bytes, layer_heads
from kvtrim.engine import CompressionStats, Compressor, decoding_schedule
from kvtrim.errors import KVTrimError
from kvtrim.methods import Scorer, make_scorer
from kvtrim.models import max_context, text_config
from kvtrim.prompting import PromptLayout, encode, layout_for
from kvtrim.reconstruction import evict_by_reconstruction

if TYPE_CHECKING:
    from kvtrim.batch import BatchSession


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
    #: set when evicting while decoding: attached during every answer, reset after it
    compressor: Compressor | None = None
    #: the budget policy's name (``uniform``, ``pyramid``, ``adaptive``, ...)
    budget: str = "uniform"
    #: the question compressed together with the context (query-aware), or None
    question: str | None = None

    def ask(self, question: str | None = None, max_new_tokens: int = 64, answer_prefix: str = "") -> str:
        """Answer ``question`` from the compressed cache (greedy decoding).

        ``answer_prefix`` is put after the prompt's end (after the assistant tag with a chat
        template) and the model continues it, as benchmarks like RULER do; it is not part of the
        returned text. A query-aware session already holds its question: pass it again or None.
        """
        return self.answer(question, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix).text

    def prompt_ids(
        self, question: str | None, max_new_tokens: int, answer_prefix: str = ""
    ) -> tuple[str, list[int]]:
        """The question answered and the tokens fed after the compressed cache before decoding.

        A query-aware session holds its question already: only the template's closing and the
        answer prefix follow. Refuses an empty question and a prompt beyond the model's window.
        """
        if max_new_tokens < 1:
            raise KVTrimError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.question is not None:
            if question is not None and question != self.question:
                raise KVTrimError(
                    "This session compressed its question with the context (query-aware) and can "
                    "answer only that one; compress again with question=... to ask another."
                )
            question = self.question
            # The question is in the cache already: only the prompt's closing follows it.
            ids = encode(self.tokenizer, self.layout.question_suffix + answer_prefix)
            if not ids:
                raise KVTrimError(
                    "Nothing follows the compressed question in this prompt layout; give an "
                    "answer_prefix for the model to continue."
                )
        else:
            if question is None or not question.strip():
                raise KVTrimError("The question is empty.")
            ids = encode(self.tokenizer, self.layout.question_text(question) + answer_prefix)
        limit = max_context(self.model)
        if self.context_length + len(ids) + max_new_tokens > limit:
            raise KVTrimError(
                f"Context ({self.context_length}) + question ({len(ids)}) + max_new_tokens "
                f"({max_new_tokens}) tokens exceed the model's window of {limit} tokens."
            )
        return question, ids

    @torch.inference_mode()
    def answer(
        self, question: str | None = None, max_new_tokens: int = 64, answer_prefix: str = ""
    ) -> Answer:
        """Like :meth:`ask`, returning token ids and timing as well."""
        question, ids = self.prompt_ids(question, max_new_tokens, answer_prefix)
        start = time.perf_counter()
        snapshot = CacheSnapshot.take(self.cache)
        evicting = self.compressor is not None and self.compressor.decoding is not None
        state = self.compressor.decoding_state() if evicting else None
        try:
            with self.compressor.attached() if evicting else nullcontext():
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
            if state is not None:
                self.compressor.restore_decoding_state(state)
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        result = Answer(question, text, generated, time.perf_counter() - start)
        self.answers.append(result)
        return result


def encode_context(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    use_chat_template: bool | None,
    question: str | None = None,
) -> tuple[PromptLayout, list[int]]:
    """Lay out and tokenize the part of the prompt to compress: the context, then (query-aware) the
    question with its prefix but not the template's closing. Refuses an empty context or question,
    and a prompt beyond the model's window.

    The question is tokenized apart from the context, at the same boundary as when it is asked
    after a compressed context, so both layouts hold the same tokens."""
    if not context or not context.strip():
        raise KVTrimError("The context is empty: give some text to compress.")
    layout = layout_for(tokenizer, context, use_chat_template)
    ids = encode(tokenizer, layout.context_text, layout.add_special_tokens)
    what = "context"
    if question is not None:
        if not question.strip():
            raise KVTrimError("The question is empty.")
        ids += encode(tokenizer, layout.question_prefix + question)
        what = "context with its question"
    limit = max_context(model)
    if len(ids) >= limit:
        raise KVTrimError(
            f"The {what} is {len(ids)} tokens long, longer than the model's window of {limit} tokens; "
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


def _reconstruction_prefiller(compressor: Compressor, chunk_size: int | None) -> Compressor:
    """The prefill of a reconstruction scorer keeps every pair (sliding layers are still compacted)."""
    if chunk_size is not None:
        raise KVTrimError(
            f"Method {compressor.scorer.name!r} scores the whole prefilled context at once; "
            "it does not support chunked prefill (drop chunk_size / --chunk)."
        )
    return Compressor(compressor.model, make_scorer("none"), compressor.ratio, seed=compressor.seed)


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


@overload
def compress(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    method: str | Scorer = ...,
    ratio: float = ...,
    **kwargs: Any,
) -> Session: ...


@overload
def compress(
    model: nn.Module,
    tokenizer: Any,
    context: Sequence[str],
    method: str | Scorer = ...,
    ratio: float = ...,
    **kwargs: Any,
) -> BatchSession: ...


@torch.inference_mode()
def compress(
    model: nn.Module,
    tokenizer: Any,
    context: str | Sequence[str],
    method: str | Scorer = "expected-attention",
    ratio: float = 0.5,
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
    budget: str | Budget = "uniform",
    budget_options: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    decode_budget: int | None = None,
    evict_every: int = 16,
    question: str | None = None,
    key_channels: float = 0.0,
    **options: Any,
) -> Session | BatchSession:
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

    ``decode_budget=N`` keeps evicting while answering: every ``evict_every`` tokens, layers
    holding more than N pairs per head are evicted with the same scorer (see
    :class:`~kvtrim.engine.DecodingSchedule`), for long generations in bounded memory.

    A list of contexts is prefilled as one left-padded batch and gives a
    :class:`~kvtrim.batch.BatchSession`; each context keeps exactly what it would keep alone.

    ``question=q`` compresses the question together with the context (query-aware): it is
    prefilled right after the context (inside the same user message with a chat template), so
    scorers see it — SnapKV's observation window is then the question. The session answers that
    question only (``session.ask()``); the template's closing and any answer prefix follow the
    compressed cache. Methods flagged ``query_aware`` (``snapkv-query-aware``) require it.

    ``key_channels=r`` also prunes the fraction r of every layer's key channels (ThinK, arXiv
    2407.21018): each kv-head keeps the ``D − floor(r·D)`` channels with the largest
    ‖Q_window[:, c]‖·‖K[:, c]‖ over the last 32 context queries, and stores its keys as
    (T, D_kept). It composes with any token-eviction method and budget, not with chunked prefill
    or reconstruction methods (kvzip).
    """
    if not isinstance(context, str):
        from kvtrim.batch import compress_batch

        if chunk_size is not None or decode_budget is not None or question is not None or key_channels:
            raise KVTrimError(
                "Batches do not support chunked prefill, decoding eviction, query-aware compression "
                "or key-channel pruning yet."
            )
        return compress_batch(
            model,
            tokenizer,
            list(context),
            method,
            ratio,
            use_chat_template=use_chat_template,
            seed=seed,
            budget=make_budget(budget, **(budget_options or {})),
            **options,
        )
    from transformers import DynamicCache

    scorer = make_scorer(method, **options)
    if scorer.query_aware and question is None:
        raise KVTrimError(
            f"Method {scorer.name!r} compresses the question with the context: pass question=... "
            "(kvtrim ask does so for each -q)."
        )
    if scorer.needs_reconstruction and question is not None:
        raise KVTrimError(f"Method {scorer.name!r} reconstructs the context alone; it takes no question.")
    layout, ids = encode_context(model, tokenizer, context, use_chat_template, question)
    policy = make_budget(budget, **(budget_options or {}))
    budget_name = policy.name
    if chunk_size is not None:
        policy = _chunked_budget(scorer, policy, len(ids), check_ratio(ratio), chunk_size)
    if key_channels and (chunk_size is not None or scorer.needs_reconstruction or decode_budget is not None):
        raise KVTrimError(
            "key_channels (ThinK) prunes each layer's key channels during a one-shot prefill; it does "
            f"not combine with chunked prefill, decoding eviction or {scorer.name!r}'s scoring after "
            "the prefill."
        )
    decoding = decoding_schedule(scorer, policy, decode_budget, evict_every)
    compressor = Compressor(
        model, scorer, ratio, seed=seed, budget=policy, decoding=decoding, key_channels=key_channels
    )
    compressor.every_forward = chunk_size is not None
    # A reconstruction scorer (KVzip) needs the whole uncompressed cache: prefill without evicting.
    prefiller = (
        _reconstruction_prefiller(compressor, chunk_size) if scorer.needs_reconstruction else compressor
    )
    scorer.setup(model, tokenizer)
    compressor.budget.setup(model, tokenizer)
    device = next(model.parameters()).device
    cache = DynamicCache(config=text_config(model))
    step = chunk_size or len(ids)
    start = time.perf_counter()
    with prefiller.attached():
        for begin in range(0, len(ids), step):
            end = min(begin + step, len(ids))
            model(
                input_ids=torch.tensor([ids[begin:end]], device=device),  # (1, chunk)
                position_ids=torch.arange(begin, end, device=device)[None],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    if prefiller is not compressor:
        evict_by_reconstruction(model, tokenizer, cache, compressor, layout, context, len(ids))
    if chunk_size is not None:
        peak = compressor.stats.kv_bytes_peak
        compressor.stats = _final_stats(cache, len(ids), compressor.stats.compress_s)
        compressor.stats.kv_bytes_peak = peak
    compressor.every_forward = False
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
        compressor=compressor if decoding is not None else None,
        budget=budget_name,
        question=question,
    )
