"""The one protocol every caller reads cache layers through: bytes, pairs, heads, state.

The cache is transformers' own ``DynamicCache``: its dense layers (``DynamicLayer``, and
``DynamicSlidingWindowLayer`` for Gemma 3's windows) stay as they are, with smaller tensors once
compressed — every transformers code path keeps working. Layers only kvtrim makes (ragged heads,
pruned key channels, cell batches) subclass :class:`KVTrimLayer` and answer the protocol
themselves; the functions below answer it for any layer, so no caller probes attributes.
Byte figures are read from the tensors' real storage.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin


class KVTrimLayer(CacheLayerMixin):
    """Base of kvtrim's cache layers (B = 1 unless a subclass says otherwise)."""

    is_sliding = False
    is_croppable = False
    #: (B, Hkv, Dk) key channels kept by ThinK, or None when keys keep every channel
    key_channels: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of storage the layer holds."""
        raise NotImplementedError

    def n_pairs(self) -> int:
        """Cached (batch, kv-head, position) entries."""
        raise NotImplementedError

    def held_tokens(self) -> int:
        """Length of the stored sequence axis (the longest head's); ``get_seq_length()`` may
        count more (a sliding-window layer answers the tokens it has seen)."""
        return int(self.get_seq_length())

    def n_heads(self) -> int:
        """Batch × kv-heads: how many (batch, head) sequences the layer holds."""
        raise NotImplementedError

    def batch_size(self) -> int:
        raise NotImplementedError

    def head_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each KV head's kept pairs: Hkv × (keys (K_h, D), values (K_h, Dv)) (B = 1)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """References to what an update changes, for :meth:`restore` (no copy)."""
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError(f"a {type(self).__name__} cannot be reset; build a new cache")


class DenseKVTrimLayer(KVTrimLayer):
    """A kvtrim layer whose keys are one dense (B, Hkv, T, ·) tensor: its shape answers the counts."""

    keys: torch.Tensor

    def n_pairs(self) -> int:
        return int(self.keys.shape[0] * self.keys.shape[1] * self.keys.shape[2])

    def n_heads(self) -> int:
        return int(self.keys.shape[0] * self.keys.shape[1])

    def batch_size(self) -> int:
        return int(self.keys.shape[0])


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``tensor`` (what the allocator really holds for it)."""
    return 0 if tensor is None else tensor.untyped_storage().nbytes()


def logical_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of the elements a tensor shows (its storage may be larger, e.g. a slice)."""
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its elements (copies a slice of a bigger storage)."""
    return tensor.clone() if tensor_bytes(tensor) > logical_bytes(tensor) else tensor


def layer_bytes(layer: Any) -> int:
    if isinstance(layer, KVTrimLayer):
        return layer.nbytes()
    return tensor_bytes(layer.keys) + tensor_bytes(layer.values)


def layer_heads(layer: Any) -> int:
    """Batch × kv-heads of a layer: how many (batch, head) sequences it holds."""
    if isinstance(layer, KVTrimLayer):
        return layer.n_heads()
    return layer.keys.shape[0] * layer.keys.shape[1]


def layer_tokens(layer: Any) -> int:
    """Length of the layer's sequence axis (the longest head's, for a ragged layer). Not
    ``get_seq_length()``: a sliding-window layer reports every token it has seen there."""
    if isinstance(layer, KVTrimLayer):
        return layer.held_tokens()
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else int(keys.shape[-2])


def layer_batch_size(layer: Any) -> int:
    return layer.batch_size() if isinstance(layer, KVTrimLayer) else int(layer.keys.shape[0])


def is_sliding(layer: Any) -> bool:
    """Whether the layer keeps a sliding window only (transformers' own flag; absent means no)."""
    return bool(getattr(layer, "is_sliding", False))


def layer_pairs(layer: Any) -> int:
    if isinstance(layer, KVTrimLayer):
        return layer.n_pairs()
    keys = layer.keys
    return 0 if keys is None or keys.numel() == 0 else int(keys.shape[0] * keys.shape[1] * keys.shape[2])


def head_pairs(layer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A single-context layer's kept pairs per KV head: Hkv × (keys (K_h, D), values (K_h, Dv))."""
    if isinstance(layer, KVTrimLayer):
        return layer.head_pairs()
    return [(layer.keys[0, h], layer.values[0, h]) for h in range(layer.keys.shape[1])]


def has_pruned_channels(layer: Any) -> bool:
    """Whether the layer stores its keys on a subset of their channels (ThinK)."""
    return isinstance(layer, KVTrimLayer) and layer.key_channels is not None


def layer_state(layer: Any) -> dict[str, Any]:
    if isinstance(layer, KVTrimLayer):
        return layer.state()
    names = ("keys", "values", "cumulative_length", "is_initialized")
    return {name: getattr(layer, name) for name in names if hasattr(layer, name)}


def restore_layer(layer: Any, state: dict[str, Any]) -> None:
    if isinstance(layer, KVTrimLayer):
        layer.restore(state)
        return
    for key, value in state.items():
        setattr(layer, key, value)


def is_first_forward(layer: Any, q_len: int) -> bool:
    """True when the layer has seen nothing but the current forward's tokens (its prefill)."""
    seen = getattr(layer, "cumulative_length", None)  # sliding-window layers count what they dropped
    if isinstance(seen, int):
        return seen == q_len
    return layer_tokens(layer) == q_len


def cache_bytes(cache: Any) -> int:
    """Total bytes held by the K/V tensors of every layer."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def sliding_bytes(cache: Any) -> int:
    """Bytes held by the cache's sliding-window layers (Gemma 3's windows, left whole)."""
    return sum(layer_bytes(layer) for layer in cache.layers if is_sliding(layer))


def cache_tokens(cache: Any) -> int:
    """Total cached pairs summed over layers and kv-heads (B = 1) — a size, not a length."""
    return sum(layer_pairs(layer) for layer in cache.layers)
