"""Scoring by context reconstruction (KVzip), after an uncompressed prefill.

Most methods score a layer from what its prefill already computed, so the engine evicts each
layer right after its attention. KVzip instead scores the *whole* prefilled cache with extra
forwards in which the model repeats the context. Those forwards need every layer's full cache,
so the context is prefilled without eviction, then:

1. each reconstruction input (prompt + a chunk of the context) is fed at positions T, T+1, …
   right after the context; the engine hands every attention layer to a recorder that scores its
   cache with the scorer (blockwise attention from the reconstruction queries, never a full T×T
   matrix) and keeps the running max over chunks;
2. after each forward the cache is restored to the context alone (zero-copy snapshot), so no
   reconstruction token's K/V remains;
3. every full-attention layer then keeps its budget's choice, counted as the engine counts.

The cache peaks at the full context plus one chunk; ``stats.kv_bytes_peak`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kvtrim.attention import enable
from kvtrim.attention.dense import keeping_log_sum_exp
from kvtrim.budgets.base import Budget
from kvtrim.budgets.uniform import UniformBudget
from kvtrim.cache.layers import cache_bytes, is_sliding, layer_tokens
from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.core.clock import device_time
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import LayerCall
from kvtrim.engine.compressor import Compressor
from kvtrim.engine.eviction import Selector, evict_by_scores
from kvtrim.generation import prefill
from kvtrim.models.adapters import check_supported, max_context, model_device
from kvtrim.models.forward import forward, new_cache
from kvtrim.models.prompting import PromptLayout, encode_context
from kvtrim.schedules import AfterPrefill, Schedule
from kvtrim.scorers.base import Scorer
from kvtrim.scorers.simple import NoEviction
from kvtrim.sessions.session import Session
from kvtrim.strategies.output_gradients import output_gradient_norms
from kvtrim.strategies.plan import Plan


class ReconstructionRecorder(Schedule):
    """On every forward, scores each full-attention layer's context pairs; evicts nothing."""

    def __init__(self, scorer: Scorer, context_length: int):
        self.scorer = scorer
        self.context_length = context_length
        #: attention module -> (B, H, q) log-sum-exp of its latest call (see ``keeping_log_sum_exp``)
        self.lse: Mapping[nn.Module, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, T) max over forwards

    def takes(self, call: LayerCall) -> bool:
        return True

    def compress_layer(self, call: LayerCall) -> None:
        layer = call.layer
        keys = layer.keys  # (B, Hkv, T + q, D): the context, then this forward's tokens
        view = call.view(keys, layer.values, call.key_positions(keys))
        lse = self.lse.get(call.attn)
        scores = self.scorer.score_reconstruction(view, lse, self.context_length)  # (B, Hkv, T)
        best = self.scores.get(call.idx)
        self.scores[call.idx] = scores if best is None else torch.maximum(best, scores)


def keep_everything() -> Schedule:
    """A prefill that evicts nothing (sliding-window layers are still compacted)."""
    return AfterPrefill(Selector(NoEviction(), UniformBudget(), 0.0))


@torch.inference_mode()
def score_by_reconstruction(
    model: nn.Module,
    tokenizer: Any,
    cache: Any,
    scorer: Scorer,
    layout: PromptLayout,
    context: str,
    context_length: int,
    seed: int = 0,
) -> tuple[dict[int, torch.Tensor], int]:
    """Per full-attention layer, the scores (B, Hkv, T) of its cached context pairs, and the
    largest cache (bytes) held meanwhile. ``cache`` holds the uncompressed context and is left so."""
    room = max_context(model) - context_length
    if scorer.needs_output_gradients:
        chunks = scorer.reconstruction_chunks(tokenizer, layout, context, room)
    else:
        chunks = [(ids, 0) for ids in scorer.reconstruction_inputs(tokenizer, layout, context, room)]
    enable(model)  # kvtrim's attention (sdpa's kernel) is what can hand over the log-sum-exp
    recorder = ReconstructionRecorder(scorer, context_length)
    compressor = Compressor(model, recorder, seed=seed)
    snapshot = CacheSnapshot.take(cache)
    peak = cache_bytes(cache)
    gradients = [  # KVgrad: ‖∂Φ/∂a‖ of every input, each from its own pass before any is scored
        output_gradient_norms(model, cache, ids, _positions(context_length, ids), n_targets)
        if scorer.needs_output_gradients
        else None
        for ids, n_targets in chunks
    ]
    with keeping_log_sum_exp() as recorder.lse, compressor.attached():
        for (ids, _), grads in zip(chunks, gradients, strict=True):
            positions = _positions(context_length, ids)  # (1, q)
            if grads is not None:
                scorer.output_gradients = grads
            try:
                forward(model, [ids], positions, cache)
                peak = max(peak, cache_bytes(cache))
            finally:
                snapshot.restore(cache)  # drop the reconstruction tokens' K/V
    return recorder.scores, max(peak, compressor.stats.kv_bytes_peak)


def _positions(context_length: int, ids: list[int]) -> torch.Tensor:
    """(1, q) positions of a reconstruction input fed right after the context."""
    return torch.arange(context_length, context_length + len(ids))[None]


def reconstruction_choices(
    model: nn.Module,
    tokenizer: Any,
    cache: Any,
    scorer: Scorer,
    layout: PromptLayout,
    context: str,
    context_length: int,
    ratios: list[float],
    policies: Mapping[str, Budget],
    seed: int,
) -> dict[tuple[float, str], list[torch.Tensor | None]]:
    """Each (ratio, budget)'s choice for a reconstruction scorer, from one reconstruction of the
    full cache: its scores depend on neither, and compressing applies the budget per layer."""
    scores, _ = score_by_reconstruction(
        model, tokenizer, cache, scorer, layout, context, context_length, seed
    )
    full_layers = [idx for idx, layer in enumerate(cache.layers) if not is_sliding(layer)]
    n_layers = len(cache.layers)
    cells: dict[tuple[float, str], list[torch.Tensor | None]] = {}
    for ratio in ratios:
        for budget_name, budget in policies.items():
            selector = Selector(scorer, budget, ratio)
            evicting = {
                idx: scores[idx] for idx in full_layers if selector.evicts(layer_tokens(cache.layers[idx]))
            }
            chosen = selector.select_all(evicting, n_layers) if evicting else {}
            cells[(ratio, budget_name)] = [chosen.get(idx) for idx in full_layers]
    return cells


@torch.inference_mode()
def compress_by_reconstruction(
    model: nn.Module,
    tokenizer: Any,
    context: str | PromptLayout,
    plan: Plan,
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
    question: str | None = None,
) -> Session:
    """Prefill ``context`` keeping every pair, score it by reconstruction, then evict every layer."""
    check_supported(model)
    layout, ids = encode_context(model, tokenizer, context, use_chat_template)
    if isinstance(context, PromptLayout):
        context = context.context_text
    plan.prepare(model, tokenizer)
    cache = new_cache(model)
    with Compressor(model, keep_everything(), seed=seed).attached():
        _, prefill_s = prefill(model, cache, [ids])
    device = model_device(model)
    start = device_time(device)
    stats = CompressionStats()
    scores, peak = score_by_reconstruction(
        model, tokenizer, cache, plan.scorer, layout, context, len(ids), seed
    )
    evict_by_scores(cache, scores, plan.selector(), stats)
    stats.kv_bytes_peak = peak
    stats.compress_s = device_time(device) - start
    return plan.session(model, tokenizer, cache, layout, len(ids), stats, prefill_s)
