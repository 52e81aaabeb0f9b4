"""Several contexts of different lengths in one left-padded batch, each compressed as if alone.

The contexts are left-padded to the longest and prefilled together (one forward, padded positions
masked out). Each layer is then compressed one context at a time on that context's own pairs:
padding is never scored and never kept, and every context keeps exactly the pairs it would keep
alone. The kept pairs are left-padded again, so the cache stays one dense tensor per layer; the
:class:`~kvtrim.sessions.BatchSession` masks the padding slots in every later forward.
The planner refuses what one left-padded tensor per layer cannot hold (ragged or per-layer
budgets, sliding-window layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kvtrim.cache.keep import gather_pairs, left_padded_index
from kvtrim.cache.layers import layer_bytes
from kvtrim.core.errors import KVTrimError
from kvtrim.engine.call import LayerCall
from kvtrim.engine.compressor import Compressor
from kvtrim.engine.eviction import Selector
from kvtrim.generation import pad_token_id, prefill
from kvtrim.models.adapters import check_supported
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import encode_context
from kvtrim.schedules.base import Schedule
from kvtrim.sessions.batch import BatchSession
from kvtrim.strategies.plan import Plan


def left_padding(rows: Sequence[Sequence[int]]) -> list[int]:
    width = max(len(r) for r in rows)
    return [width - len(r) for r in rows]


class PaddedEviction(Schedule):
    """A left-padded batch: score and select each element on its own pairs, re-pad on the left."""

    def __init__(self, selector: Selector, padding: list[int]):
        self.selector = selector
        self.padding = padding
        #: per compressed layer, the left padding of each element after compression
        self.padding_after: list[list[int]] = []

    def takes(self, call: LayerCall) -> bool:
        return call.is_first_forward

    def compress_layer(self, call: LayerCall) -> None:
        """Element b's pairs are the last ``T − padding[b]`` of the layer; its view holds only
        those (and their queries), exactly what compressing that context alone would see. The kept
        indices of every element are left-padded to the longest by repeating the element's first
        kept index: those slots are masked out by the attention mask of the batch session."""
        layer, selector = call.layer, self.selector
        keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
        seq, heads = keys.shape[-2], keys.shape[1]
        bytes_before = layer_bytes(layer)
        kept: list[torch.Tensor] = []  # B × (Hkv, K_b) indices into the padded layout
        for b, pad in enumerate(self.padding):
            if not selector.evicts(seq - pad):
                kept.append(torch.arange(pad, seq, device=keys.device).expand(heads, -1))
                continue
            view = call.element_view(b, pad, lambda n: selector.layer_keep(n, call.idx, call.n_layers))
            chosen = selector.choose(view, call.n_layers)
            if chosen.dtype == torch.bool:
                raise KVTrimError("Batches work with budgets that keep as many pairs in every head.")
            kept.append(chosen[0] + pad)
        index, padding = left_padded_index(kept)  # (B, Hkv, width)
        layer.keys, layer.values = gather_pairs(keys, values, index)  # (B, Hkv, width, D) each
        self.padding_after.append(padding)
        stats = call.stats
        stats.layers_compressed += 1
        stats.kv_bytes_before += bytes_before
        stats.kv_bytes_after += layer_bytes(layer)
        stats.kv_tokens_before += (len(self.padding) * seq - sum(self.padding)) * heads
        stats.kv_tokens_after += sum(k.shape[-1] for k in kept) * heads
        stats.per_layer_kept.append(sum(k.shape[-1] for k in kept) / len(kept))


@torch.inference_mode()
def compress_batch(
    model: nn.Module,
    tokenizer: Any,
    contexts: list[str],
    plan: Plan,
    *,
    use_chat_template: bool | None = None,
    seed: int = 0,
    question: str | None = None,
) -> BatchSession:
    """Prefill ``contexts`` as one left-padded batch, compressing each as if alone (see module doc)."""
    check_supported(model)
    encoded = [encode_context(model, tokenizer, c, use_chat_template) for c in contexts]
    rows = [ids for _, ids in encoded]
    schedule = PaddedEviction(plan.selector(), left_padding(rows))
    compressor = Compressor(model, schedule, seed=seed)
    plan.prepare(model, tokenizer)
    cache = new_cache(model)
    with compressor.attached():
        padding, elapsed = prefill(model, cache, rows, pad_id=pad_token_id(tokenizer))
    after = {tuple(p) for p in schedule.padding_after}
    if len(after) > 1:
        raise KVTrimError("Layers kept different numbers of pairs; batches need the same in every layer.")
    return BatchSession(
        model=model,
        tokenizer=tokenizer,
        cache=cache,
        layouts=[layout for layout, _ in encoded],
        context_lengths=[len(ids) for ids in rows],
        padding=list(after.pop()) if after else padding,
        method=plan.scorer.name,
        ratio=plan.spec.ratio,
        stats=compressor.stats,
        prefill_s=elapsed - compressor.stats.compress_s,
        budget=plan.budget.name,
        spec=plan.spec,
    )
