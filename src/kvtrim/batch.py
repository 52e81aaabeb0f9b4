"""Several contexts of different lengths in one left-padded batch, each compressed as if alone.

The contexts are left-padded to the longest and prefilled together (one forward, padded positions
masked out). Each layer is then compressed one context at a time on that context's own pairs
(see ``Compressor._compress_padded``): padding is never scored and never kept, and every context
keeps exactly the pairs it would keep alone. The kept pairs are left-padded again, so the cache
stays one dense tensor per layer; the attention mask built here hides the padding slots in every
later forward (questions, decoded tokens), and RoPE positions stay each context's own.

Limits, each refused with a clear error: budgets must keep as many pairs in every head (uniform,
tokens), and models with sliding-window layers (Gemma 3) are not batched, because one 2-D mask
cannot describe both the compressed full-attention layers and the sliding windows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.budgets import Budget, TokenBudget, UniformBudget
from kvtrim.cache import CacheSnapshot
from kvtrim.engine import CompressionStats, Compressor
from kvtrim.errors import KVTrimError
from kvtrim.methods import Scorer, make_scorer
from kvtrim.models import max_context, text_config
from kvtrim.prompting import PromptLayout, encode
from kvtrim.session import Answer, encode_context, stop_token_ids


@dataclass
class BatchSession:
    """Compressed contexts in one batch, ready for one question each (build with :func:`compress`)."""

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
    #: the budget policy's name (``uniform`` or ``tokens``)
    budget: str = "uniform"

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
        start = time.perf_counter()
        snapshot = CacheSnapshot.take(self.cache)
        try:
            generated = batch_greedy_decode(
                self.model,
                self.cache,
                prompts,
                self.padding,
                self.context_lengths,
                limits,
                stop_ids=stop_token_ids(self.model, self.tokenizer),
                pad_id=_pad_id(self.tokenizer),
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


def _pad_id(tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Left-pad token rows: (padding per row, ids (B, W), mask (B, W) with 1 on real tokens)."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    ids = torch.tensor([[pad_id] * p + list(r) for p, r in zip(padding, rows, strict=True)])  # (B, W)
    mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(padding, rows, strict=True)])  # (B, W)
    return padding, ids, mask


def _padded_positions(padding: Sequence[int], width: int, starts: Sequence[int]) -> torch.Tensor:
    """(B, W) RoPE positions: row b counts from starts[b] at its first real token; pads repeat it."""
    steps = torch.arange(width)[None] - torch.tensor(padding)[:, None]  # (B, W)
    return steps.clamp(min=0) + torch.tensor(starts)[:, None]


def batch_greedy_decode(
    model: nn.Module,
    cache: Any,
    prompts: Sequence[Sequence[int]],
    cache_padding: Sequence[int],
    start_positions: Sequence[int],
    max_new_tokens: Sequence[int],
    stop_ids: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Feed each row's prompt after its cached context and decode greedily, all rows at once.

    The 2-D attention mask covers [cache slots | prompt slots | decoded tokens]; it hides the
    cache's padding slots and the prompts' own left padding. A row that met a stop token or its
    own ``max_new_tokens`` keeps running (rows are independent) but its further tokens are dropped.
    """
    device = next(model.parameters()).device
    prompt_padding, ids, prompt_mask = _left_pad(prompts, pad_id)  # (B, W)
    cache_len = _cache_length(cache)
    cache_mask = torch.arange(cache_len)[None] >= torch.tensor(cache_padding)[:, None]  # (B, K)
    mask = torch.cat([cache_mask.long(), prompt_mask], dim=1).to(device)  # (B, K + W)
    positions = _padded_positions(prompt_padding, ids.shape[1], start_positions).to(device)  # (B, W)
    ids = ids.to(device)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max(max_new_tokens)):
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        tokens = logits[:, -1].argmax(dim=-1)  # (B,)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
            else:
                generated[row].append(token)
                done[row] = len(generated[row]) >= max_new_tokens[row]
        if all(done):
            break
        ids = tokens[:, None]  # (B, 1)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return generated


def _cache_length(cache: Any) -> int:
    lengths = {int(layer.keys.shape[-2]) for layer in cache.layers}
    if len(lengths) != 1:
        raise KVTrimError("A batched cache needs every layer to hold as many slots.")
    return lengths.pop()


def prefill_padded(
    model: nn.Module, tokenizer: Any, compressor: Compressor, rows: Sequence[Sequence[int]]
) -> tuple[Any, list[int], float]:
    """Prefill token ``rows`` as one left-padded batch with ``compressor`` attached.

    Returns the cache, each row's left padding before compression, and the wall time (s).
    """
    from transformers import DynamicCache

    padding, ids, mask = _left_pad(rows, _pad_id(tokenizer))  # (B, W)
    compressor.padding = padding
    device = next(model.parameters()).device
    cache = DynamicCache(config=text_config(model))
    start = time.perf_counter()
    with compressor.attached():
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=_padded_positions(padding, ids.shape[1], [0] * len(rows)).to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return cache, padding, time.perf_counter() - start


def check_batchable(model: nn.Module, policy: Budget) -> None:
    """Refuse what one dense left-padded cache per layer cannot hold (see the module doc)."""
    if not isinstance(policy, (UniformBudget, TokenBudget)):
        raise KVTrimError(
            f"Batches work with the uniform and tokens budgets, not {policy.name!r}; "
            "compress the contexts one at a time for that budget."
        )
    layer_types = getattr(text_config(model), "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise KVTrimError(
            "This model has sliding-window layers, which batches do not support yet; "
            "compress the contexts one at a time."
        )


@torch.inference_mode()
def compress_batch(
    model: nn.Module,
    tokenizer: Any,
    contexts: list[str],
    method: str | Scorer = "expected-attention",
    ratio: float = 0.5,
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
    budget: Budget | None = None,
    **options: Any,
) -> BatchSession:
    """Prefill ``contexts`` as one left-padded batch, compressing each as if alone (see module doc)."""
    if not contexts:
        raise KVTrimError("Give at least one context.")
    policy = budget or UniformBudget()
    check_batchable(model, policy)
    scorer = make_scorer(method, **options)
    if scorer.query_aware or scorer.needs_reconstruction:
        raise KVTrimError(
            f"Method {scorer.name!r} needs its own prefill per context (a question, or a "
            "reconstruction pass); batches do not support it yet."
        )
    encoded = [encode_context(model, tokenizer, c, use_chat_template) for c in contexts]
    compressor = Compressor(model, scorer, ratio, seed=seed, budget=policy)
    scorer.setup(model, tokenizer)
    cache, padding, total = prefill_padded(model, tokenizer, compressor, [ids for _, ids in encoded])
    after = {tuple(p) for p in compressor.padding_after}
    if len(after) > 1:
        raise KVTrimError("Layers kept different numbers of pairs; batches need the same in every layer.")
    return BatchSession(
        model=model,
        tokenizer=tokenizer,
        cache=cache,
        layouts=[layout for layout, _ in encoded],
        context_lengths=[len(ids) for _, ids in encoded],
        padding=list(after.pop()) if after else padding,
        method=scorer.name,
        ratio=compressor.ratio,
        stats=compressor.stats,
        prefill_s=total - compressor.stats.compress_s,
        budget=policy.name,
    )
