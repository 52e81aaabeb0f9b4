"""The compressed cache: transformers' own ``DynamicCache`` whose layer tensors are replaced by
new, smaller tensors holding only the kept pairs — the evicted pairs' memory is really freed —
plus byte accounting from real tensor storage and zero-copy snapshots.

Why no custom Cache class: every transformers code path (masks, generate, sliding-window layers)
already knows ``DynamicCache``; a layer whose ``keys`` tensor is shorter is all it takes, as long
as RoPE positions are passed explicitly (the engine and session do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``tensor`` (what the allocator really holds for it)."""
    if tensor is None:
        return 0
    return tensor.untyped_storage().nbytes()


def logical_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of the elements a tensor shows (its storage may be larger, e.g. a slice)."""
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its elements (copies a slice of a bigger storage)."""
    return tensor.clone() if tensor_bytes(tensor) > logical_bytes(tensor) else tensor


def layer_bytes(layer: Any) -> int:
    if hasattr(layer, "head_keys"):  # ragged layer: one tensor per head
        return layer.nbytes()
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    # a channel-pruned layer (ThinK) also holds the indices of its kept key channels
    return tensor_bytes(keys) + tensor_bytes(values) + tensor_bytes(getattr(layer, "key_channels", None))


def layer_heads(layer: Any) -> int:
    """Batch × kv-heads of a layer: how many (batch, head) sequences it holds."""
    if hasattr(layer, "head_keys"):
        return layer.head_keys[0].shape[0] * len(layer.head_keys)
    return layer.keys.shape[0] * layer.keys.shape[1]


def layer_tokens(layer: Any) -> int:
    """Length of the layer's sequence axis (the longest head's, for a ragged layer)."""
    if hasattr(layer, "head_keys"):
        return layer.get_seq_length()
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else int(keys.shape[-2])


def cache_bytes(cache: Any) -> int:
    """Total bytes held by the K/V tensors of every layer."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def cache_tokens(cache: Any) -> int:
    """Total cached pairs summed over layers and kv-heads (B = 1) — a size, not a length."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "head_keys"):
            total += layer.n_pairs()
            continue
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            total += int(keys.shape[0] * keys.shape[1] * keys.shape[2])
    return total


def gather_positions(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Keep ``indices`` along the sequence axis, in a new contiguous tensor.

    tensor: (B, Hkv, T, D), indices: (B, Hkv, K) -> (B, Hkv, K, D)
    """
    expanded = indices[..., None].expand(-1, -1, -1, tensor.shape[-1])
    return torch.gather(tensor, 2, expanded).contiguous()


def left_padded_index(kept: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack per-element kept indices into one batch index, padded on the left.

    kept: B × (Hkv, K_b) -> index (B, Hkv, max K_b) and each element's padding. A padding slot
    repeats the element's first kept index (any real pair would do: the attention mask hides it).
    """
    width = max(k.shape[-1] for k in kept)
    index = torch.stack([torch.cat([k[:, :1].expand(-1, width - k.shape[-1]), k], dim=-1) for k in kept])
    return index, [width - k.shape[-1] for k in kept]


@dataclass
class CacheSnapshot:
    """References to every layer's tensors and counters.

    ``DynamicCache.update`` concatenates into *new* tensors, so holding the old ones is enough to
    restore the cache after a question: no copy is made.
    """

    states: list[dict[str, Any]]

    @classmethod
    def take(cls, cache: Any) -> CacheSnapshot:
        keep = ("keys", "values", "head_keys", "head_values", "cumulative_length", "is_initialized")
        return cls([{k: getattr(layer, k) for k in keep if hasattr(layer, k)} for layer in cache.layers])

    def restore(self, cache: Any) -> None:
        del cache.layers[len(self.states) :]
        for layer, state in zip(cache.layers, self.states, strict=True):
            for key, value in state.items():
                setattr(layer, key, value)
