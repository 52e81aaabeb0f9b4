"""What compressing a layer does: score, let the budget choose, keep the chosen pairs — and prune
key channels (ThinK). Schedules and strategies call these; the engine itself only dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvtrim.budgets.base import Budget
from kvtrim.budgets.uniform import UniformBudget
from kvtrim.cache.channels import key_channel_norms, prune_channels
from kvtrim.cache.keep import keep_selected
from kvtrim.cache.layers import compact, layer_bytes, layer_heads, layer_tokens, logical_bytes
from kvtrim.cache.layers import is_sliding as layer_is_sliding
from kvtrim.cache.window import WindowLayer
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import LayerCall
from kvtrim.models.adapters import queries_from_projection
from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.scorers.channels import kept_channels


@dataclass
class Selector:
    """Which pairs a layer keeps: ``scorer``'s scores, chosen by ``budget`` at ``ratio``; ``merge``
    folds the evicted values into the kept ones (:mod:`kvtrim.cache.merge`) instead of dropping them."""

    scorer: Scorer
    budget: Budget
    ratio: float
    merge: bool = False

    def evicts(self, n_tokens: int) -> bool:
        """False when nothing would be evicted (the scorer is then not even run)."""
        return self.scorer.evicts and self.budget.evicts(n_tokens, self.ratio)

    def layer_keep(self, n_tokens: int, idx: int, n_layers: int) -> int | None:
        return self.budget.layer_keep(n_tokens, idx, n_layers, self.ratio)

    def select(
        self, scores: torch.Tensor, idx: int, n_layers: int, view: LayerView | None = None
    ) -> torch.Tensor:
        """scores (B, Hkv, T) -> (B, Hkv, K) sorted indices or a (B, Hkv, T) keep mask; ``view``
        is the layer's, which a budget that ``needs_view`` must get (the planner sees to it)."""
        if self.budget.needs_view:
            if view is None:
                raise RuntimeError(f"the {self.budget.name!r} budget needs the layer's view")
            return self.budget.select_seen(scores, view, idx, n_layers, self.ratio)
        return self.budget.select(scores, idx, n_layers, self.ratio)

    def select_all(self, scores: dict[int, torch.Tensor], n_layers: int) -> dict[int, torch.Tensor]:
        """Every scored layer's choice from its scores (B, Hkv, T_l): together for a budget that
        spans layers, one by one otherwise."""
        if self.budget.spans_layers:
            return self.budget.select_layers(scores, self.ratio)
        return {idx: self.select(layer_scores, idx, n_layers) for idx, layer_scores in scores.items()}

    def choose(self, view: LayerView, n_layers: int) -> torch.Tensor:
        return self.select(self.scorer.score(view), view.layer_idx, n_layers, view)


@dataclass
class PositionTracker:
    """Absolute positions of every head's pairs, per layer, (B, Hkv, K): needed once a cache is
    compressed more than once (chunked prefill, eviction while decoding)."""

    positions: dict[int, torch.Tensor] = field(default_factory=dict)

    def get(self, idx: int) -> torch.Tensor | None:
        return self.positions.get(idx)

    def remember(
        self, idx: int, keys: torch.Tensor, key_positions: torch.Tensor, chosen: torch.Tensor | None
    ) -> None:
        """Record the positions left after keeping ``chosen`` (B, Hkv, K) of ``key_positions``."""
        full = key_positions.expand(*keys.shape[:2], -1) if key_positions.dim() == 1 else key_positions
        self.positions[idx] = full if chosen is None else torch.gather(full, 2, chosen)


def evict_layer(call: LayerCall, selector: Selector, positions: PositionTracker | None = None) -> None:
    """Compress the call's layer in place: score its pairs, keep the budget's choice, count it."""
    layer = call.layer
    keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
    seq = keys.shape[-2]
    bytes_before = layer_bytes(layer)
    call.stats.layers_compressed += 1
    key_positions = call.key_positions(keys, None if positions is None else positions.get(call.idx))
    if not selector.evicts(seq):
        if positions is not None:
            positions.remember(call.idx, keys, key_positions, None)
        call.account(layer, bytes_before, seq, seq)
        return
    budget_keep = selector.layer_keep(seq, call.idx, call.n_layers)
    view = call.view(keys, values, key_positions, budget_keep=budget_keep)
    chosen = selector.choose(view, call.n_layers)
    keep_choice(
        call.cache, call.idx, chosen, call.stats, bytes_before, positions, key_positions, selector.merge
    )


def evict_window(call: LayerCall, selector: Selector) -> None:
    """Compress a sliding-window layer within its window (``/windows``): every head keeps the
    share (1 − ratio) of the window's pairs by the scorer's scores — the uniform rule, the budget
    sharing out the full-attention layers — and the layer becomes a :class:`WindowLayer`, each
    kept pair at its position, so the window still slides over them while answering."""
    layer = call.layer
    keys, values = layer.keys, layer.values  # (B, Hkv, W', D): the window, a slice of the prefill's
    seq = keys.shape[-2]
    bytes_before = logical_bytes(keys) + logical_bytes(values)
    call.stats.layers_compressed += 1
    key_positions = call.key_positions(keys)  # (W',)
    window = Selector(selector.scorer, UniformBudget(), selector.ratio, merge=selector.merge)
    if window.evicts(seq):
        budget_keep = window.layer_keep(seq, call.idx, call.n_layers)
        view = call.view(keys, values, key_positions, budget_keep=budget_keep)
        indices = keep_selected(layer, window.choose(view, call.n_layers), selector.merge).indices
        assert indices is not None  # the uniform rule keeps as many pairs in every head
    else:
        indices = torch.arange(seq, device=keys.device).expand(*keys.shape[:2], seq)  # (B, Hkv, W')
        layer.keys, layer.values = compact(keys), compact(values)
    kept = WindowLayer.from_window(layer, indices, key_positions)
    call.cache.layers[call.idx] = kept
    call.stats.add_layer(bytes_before, layer_bytes(kept), seq, indices.shape[-1], layer_heads(kept))


def keep_choice(
    cache: Any,
    idx: int,
    chosen: torch.Tensor,
    stats: CompressionStats,
    bytes_before: int | None = None,
    positions: PositionTracker | None = None,
    key_positions: torch.Tensor | None = None,
    merge: bool = False,
) -> None:
    """Shrink layer ``idx`` to ``chosen`` (what a budget selected) and count it in ``stats``.

    Split from scoring so that methods scoring outside the prefill's hooks (KVzip scores with
    extra forwards over the whole cache) keep their pairs through the same code and accounting.
    """
    layer = cache.layers[idx]
    keys = layer.keys  # (B, Hkv, T, D)
    seq = keys.shape[-2]
    if bytes_before is None:
        bytes_before = layer_bytes(layer)
    kept = keep_selected(layer, chosen, merge)
    cache.layers[idx] = kept.layer
    if positions is not None and kept.indices is not None:
        if key_positions is None:
            key_positions = torch.arange(seq, device=keys.device)  # (T,)
        positions.remember(idx, keys, key_positions, kept.indices)
    stats.add_layer(bytes_before, layer_bytes(kept.layer), seq, kept.per_head, layer_heads(kept.layer))


def evict_by_scores(
    cache: Any, scores: dict[int, torch.Tensor], selector: Selector, stats: CompressionStats
) -> None:
    """Keep ``selector``'s choice among every scored layer's pairs, counting each layer in ``stats``
    (a layer not scored, sliding or keeping everything, counts as kept whole)."""
    n_layers = len(cache.layers)
    evicting = {
        idx: layer_scores
        for idx, layer_scores in scores.items()
        if not layer_is_sliding(cache.layers[idx]) and selector.evicts(layer_tokens(cache.layers[idx]))
    }
    chosen = selector.select_all(evicting, n_layers) if evicting else {}
    for idx, layer in enumerate(cache.layers):
        seq = layer_tokens(layer)
        if not layer_is_sliding(layer):
            stats.layers_compressed += 1
        if idx not in chosen:
            stats.add_layer(layer_bytes(layer), layer_bytes(layer), seq, seq, layer_heads(layer))
            continue
        keep_choice(cache, idx, chosen[idx], stats, merge=selector.merge)


def rerotate_keys(call: LayerCall, positions: PositionTracker) -> None:
    """Move the layer's kept keys from their true positions to 0..K−1 (key re-rotation).

    RoPE turns a key at position p by R_p, and R_a R_b = R_{a+b}, so turning it by the offset
    (new − old) gives R_new R_oldᵀ k: the key a plain prefix of K tokens would hold there. Each
    head kept its own positions, so each head turns by its own offsets. Relative distances between
    the kept pairs shrink; that is the price of an ordinary cache any engine can continue.
    """
    layer = call.layer
    old = positions.get(call.idx)  # (B, Hkv, K)
    if old is None:
        raise RuntimeError("key re-rotation needs the kept positions of every layer")
    keys = layer.keys  # (B, Hkv, K, D)
    if keys.shape[0] != 1:
        raise NotImplementedError("key re-rotation compresses one context at a time")
    new = torch.arange(keys.shape[2], device=old.device)  # (K,)
    heads = [
        call.rotate(keys[:, h : h + 1], (new - old[0, h]).to(keys.device))  # (1, 1, K, D)
        for h in range(keys.shape[1])
    ]
    layer.keys = torch.cat(heads, dim=1)  # (1, Hkv, K, D)
    positions.positions[call.idx] = new[None, None].expand_as(old)


def prune_key_channels(call: LayerCall, ratio: float, window: int) -> None:
    """ThinK: keep the layer's key channels that matter most to the last ``window`` context
    queries (:mod:`kvtrim.scorers.channels`), after token eviction, and count the bytes it frees."""
    if call.projected is None:
        raise RuntimeError("queries were not captured for this layer")
    layer = call.layer
    before = layer_bytes(layer)
    recent = call.projected[:, -window:]  # (B, W, ≥ H·D)
    position_ids = call.kwargs.get("position_ids")
    if position_ids is None:
        positions = torch.arange(call.projected.shape[1], device=recent.device)[-recent.shape[1] :]
    else:
        positions = position_ids[0, -recent.shape[1] :].to(recent.device)  # (W,)
    with torch.inference_mode():
        queries = queries_from_projection(call.attn, recent)  # (B, H, W, D) pre-RoPE
        cos, sin = call.internals.rotary(positions, like=queries)
        queries = call.internals.rope(queries, queries, cos, sin)[0]  # (B, H, W, D) post-RoPE
    channels = kept_channels(queries, key_channel_norms(layer), ratio)  # (B, Hkv, Dk)
    call.cache.layers[call.idx] = prune_channels(layer, channels)
    call.stats.kv_bytes_after += layer_bytes(call.cache.layers[call.idx]) - before
