"""Scoring by context reconstruction (KVzip), after an uncompressed prefill.

Most methods score a layer from what its prefill already computed, so the engine evicts each
layer right after its attention. KVzip instead scores the *whole* prefilled cache with extra
forwards in which the model repeats the context. Those forwards need every layer's full cache,
so the context is prefilled without eviction, then:

1. each reconstruction input (prompt + a chunk of the context) is fed at positions T, T+1, …
   right after the context; a hook on every attention layer scores the layer's cache with the
   scorer (blockwise attention from the reconstruction queries, never a full T×T matrix) and keeps
   the running max over chunks;
2. after each forward the cache is restored to the context alone (zero-copy snapshot), so no
   reconstruction token's K/V remains;
3. every full-attention layer then evicts through the same budget and accounting as the engine.

The cache peaks at the full context plus one chunk; ``stats.kv_bytes_peak`` says so.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from kvtrim.cache import CacheSnapshot, cache_bytes, layer_bytes, layer_tokens
from kvtrim.engine import CompressionStats, Compressor
from kvtrim.methods import Scorer
from kvtrim.models import max_context
from kvtrim.prompting import PromptLayout


class _ReconstructionRecorder(Compressor):
    """On every forward, scores each full-attention layer's context pairs; evicts nothing."""

    def __init__(self, model: nn.Module, scorer: Scorer, context_length: int, seed: int):
        super().__init__(model, scorer, 0.0, seed=seed)
        self.every_forward = True
        self.context_length = context_length
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, T) max over forwards

    def _compress(
        self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any, cache: Any
    ) -> None:
        keys = layer.keys  # (B, Hkv, T + q, D): the context, then this forward's tokens
        positions = self._key_positions(idx, keys, kwargs)  # (T + q,)
        view = self._view(attn, idx, keys, layer.values, kwargs, projected, positions)
        scores = self.scorer.score(view)[..., : self.context_length]  # (B, Hkv, T)
        best = self.scores.get(idx)
        self.scores[idx] = scores if best is None else torch.maximum(best, scores)


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
    inputs = scorer.reconstruction_inputs(tokenizer, layout, context, room)
    recorder = _ReconstructionRecorder(model, scorer, context_length, seed)
    device = next(model.parameters()).device
    snapshot = CacheSnapshot.take(cache)
    peak = cache_bytes(cache)
    with recorder.attached():
        for ids in inputs:
            end = context_length + len(ids)
            try:
                model(
                    input_ids=torch.tensor([ids], device=device),  # (1, q)
                    position_ids=torch.arange(context_length, end, device=device)[None],  # (1, q)
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                peak = max(peak, cache_bytes(cache))
            finally:
                snapshot.restore(cache)  # drop the reconstruction tokens' K/V
    return recorder.scores, max(peak, recorder.stats.kv_bytes_peak)


@torch.inference_mode()
def evict_by_reconstruction(
    model: nn.Module,
    tokenizer: Any,
    cache: Any,
    compressor: Compressor,
    layout: PromptLayout,
    context: str,
    context_length: int,
) -> CompressionStats:
    """Score the prefilled, uncompressed ``cache`` by reconstruction and evict every full-attention
    layer with ``compressor``'s scorer, budget and ratio. Returns the compression's figures."""
    start = time.perf_counter()
    scorer = compressor.scorer
    scores, peak = score_by_reconstruction(
        model, tokenizer, cache, scorer, layout, context, context_length, compressor.seed
    )
    for idx, layer in enumerate(cache.layers):
        seq = layer_tokens(layer)
        if getattr(layer, "is_sliding", False):  # bounded by its window: never compressed
            compressor._account(layer, layer_bytes(layer), seq, seq)
            continue
        compressor.stats.layers_compressed += 1
        if idx not in scores or not (scorer.evicts and compressor.budget.evicts(seq, compressor.ratio)):
            compressor._account(layer, layer_bytes(layer), seq, seq)
            continue
        compressor.evict(cache, idx, scores[idx])
    compressor.stats.kv_bytes_peak = max(compressor.stats.kv_bytes_peak, peak)
    compressor.stats.compress_s += time.perf_counter() - start
    return compressor.stats
