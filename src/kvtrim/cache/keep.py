"""Turning a choice of pairs into smaller tensors: the one place a kept set becomes a layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvtrim.cache.merge import merge_evicted
from kvtrim.cache.ragged import RaggedLayer


@dataclass
class KeptLayer:
    """A layer shrunk to a budget's choice (see :func:`keep_selected`)."""

    layer: Any  # the layer to store in the cache
    indices: torch.Tensor | None  # (B, Hkv, K) kept positions, or None for a ragged layer
    per_head: float  # pairs kept per head (a mean for a ragged layer)


def gather_pairs(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``indices`` (B, Hkv, K) along the sequence axis of keys and values (B, Hkv, T, D), in
    new contiguous tensors (B, Hkv, K, D): the row index is computed once, then one
    ``index_select`` per tensor copies whole rows (several times faster than advanced indexing)."""
    rows = flat_rows(indices, keys.shape[2])  # (B·Hkv·K,)
    kept_keys = tensor_rows(keys).index_select(0, rows).view(*indices.shape, *keys.shape[3:])
    kept_values = tensor_rows(values).index_select(0, rows).view(*indices.shape, *values.shape[3:])
    return kept_keys, kept_values


def tensor_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B·Hkv·T, D): a view when the tensor is contiguous."""
    return tensor.reshape(-1, *tensor.shape[3:])


def flat_rows(indices: torch.Tensor, seq: int) -> torch.Tensor:
    """(B, Hkv, K) positions in sequences of ``seq`` -> (B·Hkv·K,) rows of (B·Hkv·T, D)."""
    n_seqs = indices.shape[0] * indices.shape[1]
    starts = torch.arange(0, n_seqs * seq, seq, device=indices.device).view(*indices.shape[:2], 1)
    return (indices + starts).reshape(-1)


def left_padded_index(kept: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack per-element kept indices into one batch index, padded on the left.

    kept: B × (Hkv, K_b) -> index (B, Hkv, max K_b) and each element's padding. A padding slot
    repeats the element's first kept index (any real pair would do: the attention mask hides it).
    """
    width = max(k.shape[-1] for k in kept)
    index = torch.stack([torch.cat([k[:, :1].expand(-1, width - k.shape[-1]), k], dim=-1) for k in kept])
    return index, [width - k.shape[-1] for k in kept]


def keep_selected(layer: Any, chosen: torch.Tensor, merge: bool = False) -> KeptLayer:
    """Shrink ``layer`` to the pairs a budget chose.

    ``chosen`` is what :meth:`Budget.select` returns: (B, Hkv, K) sorted indices, or a (B, Hkv, T)
    boolean keep mask. A mask whose heads all keep the same count becomes indices, and ``layer``
    gets smaller tensors in place; uneven heads become a new :class:`RaggedLayer`, each head owning
    only its own pairs. The shared prefill calls this too (on a copy of each full layer), which is
    what keeps its cells bit-identical to compressing alone. ``merge`` folds the evicted values
    into their kept neighbours first (:mod:`kvtrim.cache.merge`).
    """
    keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
    if merge:
        values = merge_evicted(keys, values, keep_mask(chosen, keys.shape[-2]))  # (B, Hkv, T, D)
    if chosen.dtype == torch.bool:  # (B, Hkv, T) keep mask
        counts = chosen.sum(dim=-1)  # (B, Hkv)
        if not bool((counts == counts.flatten()[0]).all()):
            ragged_layer = RaggedLayer.from_mask(keys, values, chosen)
            return KeptLayer(ragged_layer, None, int(counts.sum()) / counts.numel())
        chosen = chosen.nonzero()[:, -1].view(*counts.shape, -1)  # (B, Hkv, K) sorted
    layer.keys, layer.values = gather_pairs(keys, values, chosen)
    return KeptLayer(layer, chosen, chosen.shape[-1])


def keep_mask(chosen: torch.Tensor, seq: int) -> torch.Tensor:
    """A budget's choice as a (B, Hkv, T) boolean mask: ``chosen`` is one already, or (B, Hkv, K) indices."""
    if chosen.dtype == torch.bool:
        return chosen
    mask = torch.zeros(*chosen.shape[:2], seq, dtype=torch.bool, device=chosen.device)  # (B, Hkv, T)
    return mask.scatter_(2, chosen, True)
