"""One left-padded batch prefill, every (method, ratio) cell of every context derived from it.

The batched form of :mod:`kvtrim.shared_prefill`: the contexts are prefilled together once,
uncompressed, while each layer is scored per context on that context's own pairs
(``Compressor._element_view``); each cell then gathers every context's kept pairs from the full
cache into a left-padded :class:`~kvtrim.batch.BatchSession`. Each context keeps exactly what
``kvtrim.compress(context, method, ratio)`` keeps alone. Uniform and tokens budgets only, as for
every batch (see :mod:`kvtrim.batch`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.batch import BatchSession, check_batchable, prefill_padded
from kvtrim.budgets import Budget, check_ratio
from kvtrim.cache import cache_bytes, gather_positions, left_padded_index
from kvtrim.engine import CompressionStats
from kvtrim.errors import KVTrimError
from kvtrim.methods import Scorer
from kvtrim.prompting import PromptLayout
from kvtrim.session import encode_context
from kvtrim.shared_prefill import Cell, _budget_map, _scorer_map, _ScoreRecorder


@dataclass
class SharedBatchPrefill:
    """One uncompressed batch prefill plus each cell's per-context choice of pairs."""

    model: nn.Module
    tokenizer: Any
    layouts: list[PromptLayout]
    context_lengths: list[int]
    padding: list[int]  # left padding of each context in ``full_cache``
    full_cache: Any
    prefill_s: float
    #: cell -> per layer -> per context: (1, Hkv, K_b) indices into the context's own pairs, or None
    kept: dict[Cell, list[list[torch.Tensor | None]]]
    score_s: dict[str, float] = field(default_factory=dict)
    select_s: dict[Cell, float] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        return list(self.kept)

    def session(self, method: str, ratio: float, budget: str = "uniform") -> BatchSession:
        """The batch as ``kvtrim.compress(contexts, method, ratio, budget=budget)`` would leave it."""
        key = (method, check_ratio(ratio), budget)
        if key not in self.kept:
            raise KVTrimError(f"No cell {key} in this prefill; cells: {self.cells()}")
        cache = copy.copy(self.full_cache)
        cache.layers = []
        padding = self.padding
        for layer, choices in zip(self.full_cache.layers, self.kept[key], strict=True):
            seq, heads = layer.keys.shape[2], layer.keys.shape[1]
            kept = [
                torch.arange(pad, seq, device=layer.keys.device).expand(heads, -1)
                if chosen is None
                else chosen[0] + pad
                for chosen, pad in zip(choices, self.padding, strict=True)
            ]  # B × (Hkv, K_b) indices into the padded layout
            index, padding = left_padded_index(kept)  # (B, Hkv, width)
            pruned = copy.copy(layer)
            pruned.keys = gather_positions(layer.keys, index)  # (B, Hkv, width, D)
            pruned.values = gather_positions(layer.values, index)
            cache.layers.append(pruned)
        session = BatchSession(
            model=self.model,
            tokenizer=self.tokenizer,
            cache=cache,
            layouts=self.layouts,
            context_lengths=self.context_lengths,
            padding=padding,
            method=method,
            ratio=key[1],
            stats=CompressionStats(),
            prefill_s=self.prefill_s,
            budget=budget,
        )
        session.stats = _batch_stats(session, self.score_s.get(method, 0.0) + self.select_s.get(key, 0.0))
        return session


def _batch_stats(session: BatchSession, compress_s: float) -> CompressionStats:
    """The batch's figures: every context's own pairs, and the bytes the padded cache really holds."""
    total = CompressionStats(compress_s=compress_s)
    for b in range(len(session)):
        own = session.element_stats(b)
        total.kv_tokens_before += own.kv_tokens_before
        total.kv_tokens_after += own.kv_tokens_after
        total.kv_bytes_before += own.kv_bytes_before
    total.kv_bytes_after = cache_bytes(session.cache)
    total.layers_compressed = len(session.cache.layers)
    return total


@torch.inference_mode()
def prefill_batch_once(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    methods: Iterable[str | Scorer] | Mapping[str, Scorer],
    ratios: Iterable[float],
    *,
    budgets: Iterable[str | Budget] | Mapping[str, Budget] = ("uniform",),
    use_chat_template: bool | None = None,
    seed: int = 0,
) -> SharedBatchPrefill:
    """Prefill ``contexts`` once as a batch, scoring each with every method; see the module doc."""
    if not contexts:
        raise KVTrimError("Give at least one context.")
    policies = _budget_map(budgets)
    for policy in policies.values():
        check_batchable(model, policy)
    scorers = _scorer_map(methods)
    encoded = [encode_context(model, tokenizer, c, use_chat_template) for c in contexts]
    ratio_list = [check_ratio(r) for r in ratios]
    for scorer in scorers.values():
        scorer.setup(model, tokenizer)
    for policy in policies.values():
        policy.setup(model, tokenizer)
    recorder = _ScoreRecorder(model, scorers, ratio_list, policies, seed)
    cache, padding, total = prefill_padded(model, tokenizer, recorder, [ids for _, ids in encoded])
    return SharedBatchPrefill(
        model=model,
        tokenizer=tokenizer,
        layouts=[layout for layout, _ in encoded],
        context_lengths=[len(ids) for _, ids in encoded],
        padding=padding,
        full_cache=cache,
        prefill_s=total - recorder.stats.compress_s,
        kept=recorder.kept,
        score_s=recorder.score_s,
        select_s=recorder.select_s,
    )
