"""One left-padded batch prefill, every (method, ratio) cell of every context derived from it.

The batched form of :mod:`kvtrim.strategies.shared_prefill`: the contexts are prefilled together
once, uncompressed, while each layer is scored per context on that context's own pairs; each cell
then gathers every context's kept pairs from the full cache into a left-padded
:class:`~kvtrim.sessions.BatchSession`. Each context keeps exactly what
``kvtrim.compress(context, method, ratio)`` keeps alone. Uniform and tokens budgets only, as for
every batch (:func:`kvtrim.strategies.planner.check_batchable`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim.budgets.base import Budget
from kvtrim.cache.keep import gather_pairs, left_padded_index
from kvtrim.cache.layers import cache_bytes
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import check_ratio
from kvtrim.core.spec import Cell
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.compressor import Compressor
from kvtrim.generation import pad_token_id, prefill
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import PromptLayout, encode_context
from kvtrim.scorers.base import Scorer
from kvtrim.sessions.batch import BatchSession
from kvtrim.strategies.padded_batch import left_padding
from kvtrim.strategies.planner import budget_map, check_batchable, check_shared_scorers, scorer_map
from kvtrim.strategies.recorder import ScoreRecorder, recorded_cell


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
        key = recorded_cell(self.kept, method, ratio, budget)
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
            pruned.keys, pruned.values = gather_pairs(layer.keys, layer.values, index)  # (B, Hkv, width, D)
            cache.layers.append(pruned)
        session = BatchSession(
            model=self.model,
            tokenizer=self.tokenizer,
            cache=cache,
            layouts=self.layouts,
            context_lengths=self.context_lengths,
            padding=padding,
            method=method,
            ratio=key.ratio,
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
    policies = budget_map(budgets)
    for policy in policies.values():
        check_batchable(model, policy)
    scorers = scorer_map(methods)
    check_shared_scorers(scorers, None)
    encoded = [encode_context(model, tokenizer, c, use_chat_template) for c in contexts]
    rows = [ids for _, ids in encoded]
    ratio_list = [check_ratio(r) for r in ratios]
    for scorer in scorers.values():
        scorer.setup(model, tokenizer)
    for policy in policies.values():
        policy.setup(model, tokenizer)
    recorder = ScoreRecorder(scorers, ratio_list, policies, padding=left_padding(rows))
    compressor = Compressor(model, recorder, seed=seed)
    cache = new_cache(model)
    with compressor.attached():
        padding, total = prefill(model, cache, rows, pad_id=pad_token_id(tokenizer))
    return SharedBatchPrefill(
        model=model,
        tokenizer=tokenizer,
        layouts=[layout for layout, _ in encoded],
        context_lengths=[len(ids) for ids in rows],
        padding=padding,
        full_cache=cache,
        prefill_s=total - compressor.stats.compress_s,
        kept=recorder.kept,
        score_s=recorder.score_s,
        select_s=recorder.select_s,
    )
