"""The compressed cache: transformers' ``DynamicCache`` whose layers hold only the kept pairs
(their memory really freed), kvtrim's own layer types, byte accounting and snapshots."""

from kvtrim.cache.channels import ChannelPrunedLayer
from kvtrim.cache.keep import KeptLayer, gather_pairs, keep_selected, left_padded_index
from kvtrim.cache.layers import (
    KVTrimLayer,
    cache_bytes,
    cache_tokens,
    compact,
    has_pruned_channels,
    head_pairs,
    is_first_forward,
    is_sliding,
    layer_batch_size,
    layer_bytes,
    layer_heads,
    layer_tokens,
    logical_bytes,
    tensor_bytes,
)
from kvtrim.cache.masked import HeadMaskedLayer
from kvtrim.cache.ragged import RaggedLayer
from kvtrim.cache.snapshot import CacheSnapshot

__all__ = [
    "CacheSnapshot",
    "ChannelPrunedLayer",
    "HeadMaskedLayer",
    "KVTrimLayer",
    "KeptLayer",
    "RaggedLayer",
    "cache_bytes",
    "cache_tokens",
    "compact",
    "gather_pairs",
    "has_pruned_channels",
    "head_pairs",
    "is_first_forward",
    "is_sliding",
    "layer_batch_size",
    "keep_selected",
    "layer_bytes",
    "layer_heads",
    "layer_tokens",
    "left_padded_index",
    "logical_bytes",
    "tensor_bytes",
]
