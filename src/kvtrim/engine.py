"""Compress each layer's cache during prefill, right after that layer's attention ran.

Two forward hooks per layer, both standard PyTorch seams (no monkeypatching):
- on the query projection: keep a reference to its output, so scorers get the queries without
  recomputing them (recomputing would cost ~8% of a prefill);
- on the attention module: once the layer has written its K/V into the cache, score the pairs,
  keep the top ones and swap the layer's tensors for smaller ones. The next layer then runs with
  this layer already compressed, so at most one layer's cache is uncompressed at any time.

Compression happens on the *first* forward of a cache (its prefill); later forwards — the
question, decoded tokens — only read the compressed cache, unless a :class:`DecodingSchedule`
asks to keep evicting while decoding (the schedule axis), or chunked prefill compresses every
forward. A batch of left-padded contexts is scored one context at a time on its own pairs, so
padding is never scored nor kept.
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
from kvtrim.budgets import Budget, UniformBudget, check_ratio, make_budget, top_indices
from kvtrim.cache import (
    cache_bytes,
    compact,
    gather_positions,
    layer_bytes,
    layer_heads,
    layer_tokens,
    left_padded_index,
    logical_bytes,
)
from kvtrim.channels import ChannelPrunedLayer, check_channel_ratio, kept_channels
from kvtrim.errors import KVTrimError
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
    #: (layer, head) evictions made while decoding (DecodingSchedule), counted per layer
    decode_evictions: int = 0
    decode_evict_s: float = 0.0

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


@dataclass(frozen=True)
class DecodingSchedule:
    """Keep evicting while decoding, so long generations stay within ``tokens`` pairs per head.

    After every forward that follows the prefill (the question, each decoded token), a layer whose
    heads hold more than ``tokens`` pairs is evicted down to ``tokens − every + 1``: there is then
    room for ``every − 1`` more tokens, so evictions happen once every ``every`` steps and the cache
    never holds more than ``tokens`` pairs per head between steps (the step that triggers an
    eviction attends over ``tokens + 1`` pairs, its own included). Scorers see the queries of the
    last ``query_window`` tokens (the prefill's last ones at first).
    """

    tokens: int
    every: int = 16
    query_window: int = 32

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise KVTrimError(f"The decoding budget must be >= 1 pair per head, got {self.tokens}.")
        if not 1 <= self.every <= self.tokens:
            raise KVTrimError(
                f"evict_every must be between 1 and the decoding budget ({self.tokens}), got {self.every}."
            )
        if self.query_window < 1:
            raise KVTrimError(f"query_window must be >= 1, got {self.query_window}.")

    @property
    def target(self) -> int:
        """Pairs per head left after an eviction."""
        return self.tokens - self.every + 1


def decoding_schedule(
    scorer: Scorer, budget: Budget, decode_budget: int | None, evict_every: int
) -> DecodingSchedule | None:
    """Validate decoding-phase eviction: it needs per-head positions and dense (not ragged) heads."""
    if decode_budget is None:
        return None
    if not (scorer.chunkable and scorer.evicts):
        from kvtrim.methods import METHODS

        names = ", ".join(name for name, cls in METHODS.items() if cls.chunkable and cls.evicts)
        raise KVTrimError(f"Method {scorer.name!r} cannot evict while decoding; these can: {names}.")
    if budget.name not in ("uniform", "tokens", "pyramid"):
        raise KVTrimError("Decoding eviction works with the uniform, tokens and pyramid budgets.")
    return DecodingSchedule(tokens=int(decode_budget), every=int(evict_every))


class Compressor:
    """Attaches to a model and compresses the cache of every prefill it sees while attached."""

    def __init__(
        self,
        model: nn.Module,
        scorer: Scorer,
        ratio: float,
        seed: int = 0,
        budget: str | Budget = "uniform",
        decoding: DecodingSchedule | None = None,
        key_channels: float = 0.0,
        channel_window: int = 32,
    ):
        check_supported(model)
        self.model = model
        self.scorer = scorer
        self.ratio = check_ratio(ratio)
        self.budget = make_budget(budget)
        #: ThinK: fraction of key channels pruned per layer and kv-head after token eviction
        self.key_channels = check_channel_ratio(key_channels)
        if channel_window < 1:
            raise KVTrimError(f"channel_window must be a positive number of queries, got {channel_window}.")
        self.channel_window = channel_window
        if not isinstance(self.budget, UniformBudget) or self.key_channels:
            # Uneven heads or layers, or pruned key channels, need kvtrim's attention function
            # (sdpa for ordinary caches).
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
        self.decoding = decoding
        # layer -> (projected queries (B, W, H·D), their positions (W,)): the recent queries that
        # scorers see when evicting while decoding
        self._recent_queries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: left padding (pairs) of each batch element in the cache being prefilled; None for B = 1
        self.padding: list[int] | None = None
        #: per compressed layer, the left padding of each element after compression
        self.padding_after: list[list[int]] = []

    @property
    def tracks_positions(self) -> bool:
        """Whether per-head positions are kept: needed when a cache is compressed more than once."""
        return self.every_forward or self.decoding is not None

    def decoding_state(self) -> tuple[dict, dict]:
        """What decoding eviction changes, to put back with :meth:`restore_decoding_state`."""
        return dict(self._positions), dict(self._recent_queries)

    def restore_decoding_state(self, state: tuple[dict, dict]) -> None:
        self._positions, self._recent_queries = dict(state[0]), dict(state[1])

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
                if self.decoding is not None and not getattr(layer, "is_sliding", False):
                    start = time.perf_counter()
                    self._evict_while_decoding(module, idx, layer, kwargs, projected)
                    self.stats.decode_evict_s += time.perf_counter() - start
                return  # otherwise the question or a decoded token only reads the cache
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
            if self.decoding is not None and projected is not None:
                self._remember_queries(idx, projected, _query_positions(kwargs, q_len, layer.keys.device))
            if self.padding is not None:
                self._compress_padded(module, idx, layer, kwargs, projected)
            else:
                self._compress(module, idx, layer, kwargs, projected, cache)
            if self.key_channels:
                self._prune_key_channels(module, idx, kwargs, projected, cache)
            self.stats.compress_s += time.perf_counter() - start

        return hook

    def _remember_queries(self, idx: int, projected: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the last ``query_window`` projected queries and their positions for this layer."""
        assert self.decoding is not None
        window = self.decoding.query_window
        previous = self._recent_queries.get(idx)
        if previous is not None:
            projected = torch.cat([previous[0], projected], dim=1)  # (B, W + q, H·D)
            positions = torch.cat([previous[1], positions])
        self._recent_queries[idx] = (projected[:, -window:], positions[-window:])

    def _evict_while_decoding(
        self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any
    ) -> None:
        """Evict the layer down to the schedule's target once its heads hold more than the budget."""
        assert self.decoding is not None
        keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
        key_positions = self._key_positions(idx, keys, kwargs)  # (B, Hkv, T) once tracked
        if projected is not None:
            self._remember_queries(idx, projected, _query_positions(kwargs, projected.shape[1], keys.device))
        if keys.shape[-2] <= self.decoding.tokens:
            self._remember_positions(idx, keys, key_positions, None)
            return
        recent, positions = self._recent_queries[idx]
        view = self._view(
            attn,
            idx,
            keys,
            values,
            kwargs,
            recent,
            key_positions,
            positions,
            budget_keep=self.decoding.target,
        )
        chosen = top_indices(self.scorer.score(view), self.decoding.target)  # (B, Hkv, K)
        layer.keys = gather_positions(keys, chosen)
        layer.values = gather_positions(values, chosen)
        self._remember_positions(idx, keys, key_positions, chosen)
        self.stats.decode_evictions += 1

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
        self.evict(cache, idx, self.scorer.score(view), key_positions, bytes_before)

    def evict(
        self,
        cache: Any,
        idx: int,
        scores: torch.Tensor,
        key_positions: torch.Tensor | None = None,
        bytes_before: int | None = None,
    ) -> None:
        """Keep the budget's choice among layer ``idx``'s pairs given their ``scores`` (B, Hkv, T).

        Split from scoring so that methods scoring outside the prefill's hooks (KVzip scores with
        extra forwards over the whole cache) evict through the same budget and accounting.
        """
        layer = cache.layers[idx]
        keys = layer.keys  # (B, Hkv, T, D)
        seq = keys.shape[-2]
        if bytes_before is None:
            bytes_before = layer_bytes(layer)
        if key_positions is None:
            key_positions = torch.arange(seq, device=keys.device)  # (T,)
        chosen = self.budget.select(scores, idx, len(self._attentions), self.ratio)
        kept = keep_selected(layer, chosen)
        cache.layers[idx] = kept.layer
        if kept.indices is not None:
            self._remember_positions(idx, keys, key_positions, kept.indices)
        self._account(kept.layer, bytes_before, seq, kept.per_head)

    def _element_view(
        self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any, b: int, pad: int
    ) -> LayerView:
        """Element b of a left-padded batch as if alone: its own pairs, queries and positions."""
        keys = layer.keys[b : b + 1, :, pad:]  # (1, Hkv, T_b, D)
        values = layer.values[b : b + 1, :, pad:]
        positions = torch.arange(keys.shape[-2], device=keys.device)  # (T_b,)
        own = None if projected is None else projected[b : b + 1, pad:]  # (1, T_b, H·D)
        return self._view(attn, idx, keys, values, kwargs, own, positions, query_positions=positions)

    def _compress_padded(self, attn: nn.Module, idx: int, layer: Any, kwargs: dict, projected: Any) -> None:
        """A left-padded batch: score and select each element on its own pairs, re-pad on the left.

        Element b's pairs are the last ``T − padding[b]`` of the layer; its scorer view holds only
        those (and their queries), exactly what compressing that context alone would see. The
        kept indices of every element are left-padded to the longest by repeating the element's
        first kept index: those slots are masked out by the attention mask the session builds.
        """
        assert self.padding is not None
        keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
        seq = keys.shape[-2]
        bytes_before = layer_bytes(layer)
        kept: list[torch.Tensor] = []  # B × (Hkv, K_b) indices into the padded layout
        for b, pad in enumerate(self.padding):
            n_tokens = seq - pad
            if self.scorer.evicts and self.budget.evicts(n_tokens, self.ratio):
                view = self._element_view(attn, idx, layer, kwargs, projected, b, pad)
                chosen = self.budget.select(self.scorer.score(view), idx, len(self._attentions), self.ratio)
                if chosen.dtype == torch.bool:
                    raise KVTrimError("Batches work with budgets that keep as many pairs in every head.")
                kept.append(chosen[0] + pad)
            else:
                kept.append(torch.arange(pad, seq, device=keys.device).expand(keys.shape[1], -1))
        index, padding = left_padded_index(kept)  # (B, Hkv, width)
        layer.keys = gather_positions(keys, index)  # (B, Hkv, width, D)
        layer.values = gather_positions(values, index)
        self.padding_after.append(padding)
        heads = keys.shape[1]
        self.stats.layers_compressed += 1
        self.stats.kv_bytes_before += bytes_before
        self.stats.kv_bytes_after += layer_bytes(layer)
        self.stats.kv_tokens_before += (len(self.padding) * seq - sum(self.padding)) * heads
        self.stats.kv_tokens_after += sum(k.shape[-1] for k in kept) * heads
        self.stats.per_layer_kept.append(sum(k.shape[-1] for k in kept) / len(kept))

    def _prune_key_channels(
        self, attn: nn.Module, idx: int, kwargs: dict, projected: Any, cache: Any
    ) -> None:
        """ThinK: keep the layer's key channels that matter most to the last context queries
        (see :mod:`kvtrim.channels`), after token eviction, and count the bytes it frees."""
        if projected is None:
            raise RuntimeError("queries were not captured for this layer")
        layer = cache.layers[idx]
        before = layer_bytes(layer)
        window = projected[:, -self.channel_window :]  # (B, W, ≥ H·D)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            positions = torch.arange(projected.shape[1], device=projected.device)[-window.shape[1] :]
        else:
            positions = position_ids[0, -window.shape[1] :].to(projected.device)  # (W,)
        with torch.inference_mode():
            queries = queries_from_projection(attn, window)  # (B, H, W, D) pre-RoPE
            cos, sin = rotary_for(self.model, attn)(positions, like=queries)
            queries = rope_function(attn)(queries, queries, cos, sin)[0]  # (B, H, W, D) post-RoPE
        if isinstance(layer, ragged.RaggedLayer):
            layer.prune_key_channels(kept_channels(queries, layer.key_norms(), self.key_channels))
        else:
            channels = kept_channels(queries, layer.keys.float().norm(dim=2), self.key_channels)
            cache.layers[idx] = ChannelPrunedLayer.prune(layer, channels)
        self.stats.kv_bytes_after += layer_bytes(cache.layers[idx]) - before

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
        if not self.tracks_positions:
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
        query_positions: torch.Tensor | None = None,
        budget_keep: int | None = None,
    ) -> LayerView:
        seq = keys.shape[-2]
        if query_positions is None:
            query_positions = _query_positions(kwargs, seq, keys.device)
        if budget_keep is None:
            budget_keep = self.budget.layer_keep(seq, idx, len(self._attentions), self.ratio)
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
            budget_keep=budget_keep,
            rope_key=rotary.layer_type,
            rotation_cache=_rotation_cache(rotary.rotary),
        )


def _query_positions(kwargs: dict, q_len: int, device: torch.device) -> torch.Tensor:
    """(q,) absolute positions of the current forward's tokens (batch element 0's)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return torch.arange(q_len, device=device)
    return position_ids[0, -q_len:].to(device)


@dataclass
class KeptLayer:
    """A layer shrunk to a budget's choice (see :func:`keep_selected`)."""

    layer: Any  # the layer to store in the cache
    indices: torch.Tensor | None  # (B, Hkv, K) kept positions, or None for a ragged layer
    per_head: float  # pairs kept per head (a mean for a ragged layer)


def keep_selected(layer: Any, chosen: torch.Tensor) -> KeptLayer:
    """Shrink ``layer`` to the pairs a budget chose; the one place that turns a choice into a layer.

    ``chosen`` is what :meth:`Budget.select` returns: (B, Hkv, K) sorted indices, or a (B, Hkv, T)
    boolean keep mask. A mask whose heads all keep the same count becomes indices, and ``layer``
    gets smaller tensors in place; uneven heads become a new :class:`ragged.RaggedLayer`, each
    head owning only its own pairs. The shared prefill calls this too (on a copy of each full
    layer), which is what keeps its cells bit-identical to compressing alone.
    """
    keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
    if chosen.dtype == torch.bool:  # (B, Hkv, T) keep mask
        counts = chosen.sum(dim=-1)  # (B, Hkv)
        if not bool((counts == counts.flatten()[0]).all()):
            ragged_layer = ragged.RaggedLayer.from_mask(keys, values, chosen)
            return KeptLayer(ragged_layer, None, int(counts.sum()) / counts.numel())
        chosen = chosen.nonzero()[:, -1].view(*counts.shape, -1)  # (B, Hkv, K) sorted
    layer.keys = gather_positions(keys, chosen)
    layer.values = gather_positions(values, chosen)
    return KeptLayer(layer, chosen, chosen.shape[-1])


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
    decode_budget: int | None = None,
    evict_every: int = 16,
    key_channels: float = 0.0,
    **options: Any,
) -> Iterator[Compressor]:
    """Compress the prefill of every ``model.generate`` / forward call made inside the block.

    >>> with kvtrim.compressing(model, "knorm", ratio=0.5) as press:
    ...     out = model.generate(input_ids, max_new_tokens=20)
    >>> press.stats.kv_bytes_after

    The whole prompt (question included) is compressed, so the result is question-aware; use
    :func:`kvtrim.compress` to compress a context once and ask it many questions. RoPE positions stay
    true because ``generate`` derives them from the attention mask, not from the cache length.
    Hooks are removed when the block exits, even on an exception. ``decode_budget=N`` also keeps
    every layer at most N pairs per head while generating, evicting every ``evict_every`` tokens
    (:class:`DecodingSchedule`; scorers that accept per-head positions, dense budgets).
    ``key_channels`` prunes that fraction of every layer's key channels as well (ThinK, see
    :func:`kvtrim.compress`).
    """
    scorer = make_scorer(method, **options)
    if scorer.needs_reconstruction:
        raise KVTrimError(
            f"Method {scorer.name!r} scores a context with extra forwards after its prefill, which "
            "generate() does not allow; use kvtrim.compress(model, tokenizer, context, ...) instead."
        )
    policy = make_budget(budget)  # one policy object: the schedule check and the compressor share it
    decoding = decoding_schedule(scorer, policy, decode_budget, evict_every)
    compressor = Compressor(
        model, scorer, ratio, seed=seed, budget=policy, decoding=decoding, key_channels=key_channels
    )
    scorer.setup(model, tokenizer)
    compressor.budget.setup(model, tokenizer)
    with compressor.attached() as attached:
        yield attached
