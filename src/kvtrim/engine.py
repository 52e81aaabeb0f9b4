"""Compress each layer's cache during prefill, right after that layer's attention ran.

Two forward hooks per layer, both standard PyTorch seams (no monkeypatching):
- on the query projection: keep a reference to its output, so scorers get the queries without
  recomputing them (recomputing would cost ~8% of a prefill);
- on the attention module: once the layer has written its K/V into the cache, score the pairs,
  keep the top ones and swap the layer's tensors for smaller ones. The next layer then runs with
  this layer already compressed, so at most one layer's cache is uncompressed at any time.

Compression happens on the *first* forward of a cache (its prefill): later forwards — the
question, decoded tokens — only read the compressed cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvtrim import ragged
from kvtrim.budgets import Budget, UniformBudget, check_ratio, make_budget
from kvtrim.cache import (
    cache_bytes,
    compact,
    gather_positions,
    layer_bytes,
    layer_heads,
    layer_tokens,
    logical_bytes,
)
from kvtrim.methods import LayerView, Scorer, make_scorer
from kvtrim.models import (
    attention_modules,
    check_supported,
    queries_from_projection,
    query_projection,
    rope_function,
    rotary_for,
)


@dataclass
class CompressionStats:
    """Figures of the last compression, from the real tensors (bytes are storage bytes)."""

    kv_tokens_before: int = 0
    kv_tokens_after: int = 0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    compress_s: float = 0.0
    #: largest KV cache held at any moment of the compression (bytes)
    kv_bytes_peak: int = 0
    layers_compressed: int = 0
    per_layer_kept: list[float] = field(default_factory=list)

    def add_layer(self, bytes_before: int, bytes_after: int, seq: int, keep: float, heads: int) -> None:
        """Count one layer: ``seq`` pairs per head before, ``keep`` after (a mean if ragged)."""
        self.kv_bytes_before += bytes_before
        self.kv_bytes_after += bytes_after
        self.kv_tokens_before += seq * heads
        self.kv_tokens_after += round(keep * heads)
        self.per_layer_kept.append(keep)

    @property
    def bytes_saved(self) -> int:
        return self.kv_bytes_before - self.kv_bytes_after


class Compressor:
    """Attaches to a model and compresses the cache of every prefill it sees while attached."""

    def __init__(
        self, model: nn.Module, scorer: Scorer, ratio: float, seed: int = 0, budget: str | Budget = "uniform"
    ):
        check_supported(model)
        self.model = model
        self.scorer = scorer
        self.ratio = check_ratio(ratio)
        self.budget = make_budget(budget)
        if not isinstance(self.budget, UniformBudget):
            # Uneven heads or layers need kvtrim's attention function (sdpa for ordinary caches).
            ragged.enable(model)
        self.seed = seed
        self.stats = CompressionStats()
        self._attentions = attention_modules(model)
        self._projected: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        #: compress on every forward, not only a cache's first (chunked prefill sets it)
        self.every_forward = False
        # layer -> absolute positions of the kept pairs, (B, Hkv, K); tracked once a layer has
        # been compressed and then extended (chunked prefill), where heads hold different positions
        self._positions: dict[int, torch.Tensor] = {}

    @contextmanager
    def attached(self) -> Iterator[Compressor]:
        """Register the hooks; they are removed on exit, even if the body raises.

        The scorer and the budget must be set up (``.setup(model, tokenizer)``) before the first prefill.
        """
        try:
            for idx, attn in enumerate(self._attentions):
                proj, _ = query_projection(attn)
                self._handles.append(proj.register_forward_hook(self._stash_queries(idx)))
                self._handles.append(attn.register_forward_hook(self._compress_layer(idx), with_kwargs=True))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._projected.clear()

    def _stash_queries(self, idx: int):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self._projected[idx] = output.detach()

        return hook

    def _compress_layer(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            projected = self._projected.pop(idx, None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if cache is None or hidden is None or idx >= len(cache.layers):
                return
            layer = cache.layers[idx]
            q_len = hidden.shape[1]
            if not (self.every_forward or _is_first_forward(layer, q_len)):
                return  # the question or a decoded token: the cache is only read
            if getattr(layer, "is_sliding", False):
                # Already bounded by its window, so not compressed. transformers keeps the window
                # as a slice of the whole prefill's tensor, though, holding all T pairs alive:
                # copying the window out frees them.
                held = layer_tokens(layer)
                before = logical_bytes(layer.keys) + logical_bytes(layer.values)
                layer.keys, layer.values = compact(layer.keys), compact(layer.values)
                self._account(layer, before, held, held)
                return
            # The instant this layer holds its uncompressed pairs is when the KV cache peaks.
            self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, cache_bytes(cache))
            start = time.perf_counter()
            self._compress(module, idx, layer, kwargs, projected, cache)
            self.stats.compress_s += time.perf_counter() - start

        return hook

    def _compress(
        self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any, cache: Any
    ) -> None:
        keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
        seq = keys.shape[-2]
        bytes_before = layer_bytes(layer)
        self.stats.layers_compressed += 1
        key_positions = self._key_positions(idx, keys, kwargs)  # (T,) or (B, Hkv, T)
        if not (self.scorer.evicts and self.budget.evicts(seq, self.ratio)):
            self._remember_positions(idx, keys, key_positions, None)
            self._account(layer, bytes_before, seq, seq)
            return
        view = self._view(attn, idx, keys, values, kwargs, projected, key_positions)
        chosen = self.budget.select(self.scorer.score(view), idx, len(self._attentions), self.ratio)
        if chosen.dtype == torch.bool:  # (B, Hkv, T) keep mask
            counts = chosen.sum(dim=-1)  # (B, Hkv)
            if bool((counts == counts.flatten()[0]).all()):
                chosen = chosen.nonzero()[:, -1].view(*counts.shape, -1)  # (B, Hkv, K) sorted
            else:
                cache.layers[idx] = ragged.RaggedLayer.from_mask(keys, values, chosen)
                self._account(cache.layers[idx], bytes_before, seq, int(counts.sum()) / counts.numel())
                return
        layer.keys = gather_positions(keys, chosen)
        layer.values = gather_positions(values, chosen)
        self._remember_positions(idx, keys, key_positions, chosen)
        self._account(layer, bytes_before, seq, chosen.shape[-1])

    def _key_positions(self, idx: int, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Absolute positions of the layer's cached pairs: (T,) while every head holds the same
        contiguous range, (B, Hkv, T) once earlier evictions left each head its own positions."""
        seq = keys.shape[-2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            return torch.arange(seq, device=keys.device)
        new = position_ids[0].to(keys.device)  # (q,)
        previous = self._positions.get(idx)
        if previous is None or previous.shape[-1] + len(new) != seq:
            return torch.arange(seq, device=keys.device) + (int(new[-1]) + 1 - seq)
        fresh = new[None, None].expand(*previous.shape[:2], -1)  # (B, Hkv, q)
        return torch.cat([previous, fresh], dim=-1)  # (B, Hkv, T)

    def _remember_positions(
        self, idx: int, keys: torch.Tensor, key_positions: torch.Tensor, chosen: torch.Tensor | None
    ) -> None:
        if not self.every_forward:
            return
        full = key_positions.expand(*keys.shape[:2], -1) if key_positions.dim() == 1 else key_positions
        self._positions[idx] = full if chosen is None else torch.gather(full, 2, chosen)

    def _account(self, layer: Any, bytes_before: int, seq: int, keep: float) -> None:
        """Record one layer; ``keep`` is pairs per head (a mean for ragged layers)."""
        self.stats.add_layer(bytes_before, layer_bytes(layer), seq, keep, layer_heads(layer))

    def _view(
        self,
        attn: nn.Module,
        idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
        projected: Any,
        key_positions: torch.Tensor,
    ) -> LayerView:
        seq = keys.shape[-2]
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            query_positions = position_ids[0].to(keys.device)
        else:
            query_positions = torch.arange(seq, device=keys.device)
        rope = rope_function(attn)
        rotary = rotary_for(self.model, attn)

        def pre_rope_queries() -> torch.Tensor:
            if projected is None:
                raise RuntimeError("queries were not captured for this layer")
            with torch.inference_mode():
                return queries_from_projection(attn, projected)

        def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                cos, sin = rotary(positions, like=x)
                return rope(x, x, cos, sin)[0]

        return LayerView(
            layer_idx=idx,
            keys=keys,
            values=values,
            key_positions=key_positions,
            query_positions=query_positions,
            n_heads=attn.config.num_attention_heads,
            head_dim=attn.head_dim,
            scaling=float(attn.scaling),
            pre_rope_queries=pre_rope_queries,
            rotate_fn=rotate,
            seed=self.seed,
            output_weight=_output_weight(attn),
            budget_keep=self.budget.layer_keep(seq, idx, len(self._attentions), self.ratio),
            rope_key=rotary.layer_type,
            rotation_cache=_rotation_cache(rotary.rotary),
        )


def _output_weight(attn: nn.Module) -> torch.Tensor | None:
    """W_o split per query head, (H, D, hidden): a view of ``o_proj.weight``, no copy."""
    proj = getattr(attn, "o_proj", None)
    if proj is None:
        return None
    weight = proj.weight.detach()  # (hidden, H·D)
    heads = attn.config.num_attention_heads
    return weight.view(weight.shape[0], heads, attn.head_dim).permute(1, 2, 0)  # (H, D, hidden)


def _rotation_cache(rotary: nn.Module) -> dict:
    """Averaged RoPE matrices live on the rotary module itself: shared by every layer and every
    compression of that model, and gone with the model."""
    cache = getattr(rotary, "_kvtrim_mean_rotations", None)
    if cache is None:
        cache = {}
        rotary._kvtrim_mean_rotations = cache
    return cache


def _is_first_forward(layer: Any, q_len: int) -> bool:
    """True when the layer has seen nothing but the current forward's tokens (its prefill)."""
    seen = getattr(layer, "cumulative_length", None)
    if isinstance(seen, int):
        return seen == q_len
    return layer_tokens(layer) == q_len


@contextmanager
def compressing(
    model: nn.Module,
    method: str | Scorer = "expected-attention",
    ratio: float = 0.5,
    *,
    tokenizer: Any = None,
    seed: int = 0,
    budget: str | Budget = "uniform",
    **options: Any,
) -> Iterator[Compressor]:
    """Compress the prefill of every ``model.generate`` / forward call made inside the block.

    >>> with kvtrim.compressing(model, "knorm", ratio=0.5) as press:
    ...     out = model.generate(input_ids, max_new_tokens=20)
    >>> press.stats.kv_bytes_after

    The whole prompt (question included) is compressed, so the result is question-aware; use
    :func:`kvtrim.compress` to compress a context once and ask it many questions. RoPE positions stay
    true because ``generate`` derives them from the attention mask, not from the cache length.
    Hooks are removed when the block exits, even on an exception.
    """
    scorer = make_scorer(method, **options)
    compressor = Compressor(model, scorer, ratio, seed=seed, budget=budget)
    scorer.setup(model, tokenizer)
    compressor.budget.setup(model, tokenizer)
    with compressor.attached() as attached:
        yield attached
