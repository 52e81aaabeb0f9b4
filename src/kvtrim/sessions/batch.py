"""Several compressed contexts in one left-padded batch, one question each.

Each context kept exactly the pairs it would keep alone; the kept pairs are left-padded into one
dense tensor per layer, and the attention mask hides the padding slots in every later forward
(questions, decoded tokens), RoPE positions staying each context's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.cache.serialize import cache_tensors, restore_cache
from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec
from kvtrim.core.stats import CompressionStats
from kvtrim.generation import decode, pad_token_id, stop_token_ids
from kvtrim.models.adapters import max_context, model_device
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import PromptLayout, encode
from kvtrim.sessions.answer import Answer
from kvtrim.sessions.session import Session


@dataclass
class BatchSession:
    """Compressed contexts in one batch, ready for one question each (build with :func:`kvtrim.compress`)."""

    model: nn.Module
    tokenizer: Any
    cache: Any
    layouts: list[PromptLayout]
    context_lengths: list[int]
    #: padding slots at the left of each context's kept pairs in the cache
    padding: list[int]
    method: str
    ratio: float
    stats: CompressionStats
    prefill_s: float
    answers: list[list[Answer]] = field(default_factory=list)
    #: the budget label (``uniform`` or ``tokens:tokens=N``)
    budget: str = "uniform"
    spec: CompressionSpec | None = None

    def __len__(self) -> int:
        return len(self.context_lengths)

    def ask(
        self,
        questions: Sequence[str],
        max_new_tokens: int | Sequence[int] = 64,
        answer_prefix: str | Sequence[str] = "",
    ) -> list[str]:
        """Answer ``questions[b]`` from context b (greedy decoding, all in one batch).

        ``max_new_tokens`` and ``answer_prefix`` are one value for all or one per context.
        """
        return [a.text for a in self.answer(questions, max_new_tokens, answer_prefix)]

    @torch.inference_mode()
    def answer(
        self,
        questions: Sequence[str],
        max_new_tokens: int | Sequence[int] = 64,
        answer_prefix: str | Sequence[str] = "",
    ) -> list[Answer]:
        """Like :meth:`ask`, with token ids and timing (the batch's wall time, for every answer)."""
        prompts, limits = self._prompts(questions, max_new_tokens, answer_prefix)
        start = time.perf_counter()
        snapshot = CacheSnapshot.take(self.cache)
        try:
            generated = decode(
                self.model,
                self.cache,
                prompts,
                self.context_lengths,
                limits,
                stop_token_ids(self.model, self.tokenizer),
                cache_padding=self.padding,
                pad_id=pad_token_id(self.tokenizer),
            )
        finally:
            snapshot.restore(self.cache)
        elapsed = time.perf_counter() - start
        results = [
            Answer(q, self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, elapsed)
            for q, ids in zip(questions, generated, strict=True)
        ]
        self.answers.append(results)
        return results

    def _prompts(
        self,
        questions: Sequence[str],
        max_new_tokens: int | Sequence[int],
        answer_prefix: str | Sequence[str],
    ) -> tuple[list[list[int]], list[int]]:
        """Each row's prompt ids and new-token budget, after checking they fit the model's window."""
        if isinstance(questions, str) or len(questions) != len(self):
            raise KVTrimError(f"Give one question per context: {len(self)} questions.")
        prefixes = _per_row(answer_prefix, len(self), "answer prefix")
        limits = _per_row(max_new_tokens, len(self), "max_new_tokens")
        if any(not q.strip() for q in questions):
            raise KVTrimError("A question is empty.")
        if min(limits) < 1:
            raise KVTrimError(f"max_new_tokens must be >= 1, got {min(limits)}")
        prompts = [
            encode(self.tokenizer, layout.question_text(q) + prefix)
            for layout, q, prefix in zip(self.layouts, questions, prefixes, strict=True)
        ]
        window = max_context(self.model)
        for length, prompt, new in zip(self.context_lengths, prompts, limits, strict=True):
            if length + len(prompt) + new > window:
                raise KVTrimError(
                    f"Context ({length}) + question ({len(prompt)}) + max_new_tokens ({new}) "
                    f"tokens exceed the model's window of {window} tokens."
                )
        return prompts, limits

    def element(self, b: int) -> Session:
        """Context b alone, as a :class:`Session` holding only its own pairs (no padding slots):
        it answers as the batch row does, any number of questions, and can be saved."""
        if not 0 <= b < len(self):
            raise KVTrimError(f"This batch holds contexts 0..{len(self) - 1}, not {b}.")
        tensors, layers = cache_tensors(self.cache)
        if any(meta["kind"] != "dense" for meta in layers):
            raise KVTrimError("Only a batch of dense layers can be split into sessions.")
        # (1, Hkv, K_b, D) per tensor: row b without its padding slots
        own = {name: t[b : b + 1, :, self.padding[b] :].clone() for name, t in tensors.items()}
        cache = restore_cache(new_cache(self.model), own, layers, model_device(self.model))
        return Session(
            model=self.model,
            tokenizer=self.tokenizer,
            cache=cache,
            layout=self.layouts[b],
            context_length=self.context_lengths[b],
            method=self.method,
            ratio=self.ratio,
            stats=self.element_stats(b),
            prefill_s=self.prefill_s,
            budget=self.budget,
            spec=self.spec,
        )

    def element_stats(self, b: int) -> CompressionStats:
        """Context b's own figures, as if compressed alone: its pairs only, no padding slots."""
        stats = CompressionStats(compress_s=self.stats.compress_s / len(self))
        for layer in self.cache.layers:
            keys = layer.keys  # (B, Hkv, K, D)
            heads, pair_bytes = keys.shape[1], 2 * keys.shape[-1] * keys.element_size()
            seq, keep = self.context_lengths[b], keys.shape[2] - self.padding[b]
            stats.add_layer(seq * heads * pair_bytes, keep * heads * pair_bytes, seq, keep, heads)
            stats.layers_compressed += 1
        return stats


def _per_row(value: Any, rows: int, what: str) -> list:
    """One value per batch row, from a single value or a sequence of ``rows`` values."""
    if isinstance(value, (str, int)):
        return [value] * rows
    values = list(value)
    if len(values) != rows:
        raise KVTrimError(f"Give one {what} per context ({rows}), or a single value.")
    return values
