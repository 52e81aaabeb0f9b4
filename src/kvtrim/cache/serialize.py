"""A cache as named tensors plus a short description of each layer, and back.

What a saved session stores (:mod:`kvtrim.sessions.stored`): plain tensors that safetensors can
write (no pickle), and per layer its kind and the integers that rebuild it. Every layer kvtrim
leaves after a compression is covered: transformers' dense and sliding-window layers, ragged
heads, channel-pruned keys and windows compressed within themselves. A cell batch's head-masked
layer is a transient of the benchmark, never a session's, and is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.cache.channels import ChannelPrunedLayer
from kvtrim.cache.layers import is_sliding
from kvtrim.cache.ragged import RaggedLayer
from kvtrim.cache.window import WindowLayer
from kvtrim.core.errors import KVTrimError


def cache_tensors(cache: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """``layer.<i>.<name>`` -> contiguous CPU tensor, and each layer's kind and integers."""
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    for idx, layer in enumerate(cache.layers):
        parts, meta = _layer_parts(layer)
        for name, tensor in parts.items():
            tensors[f"layer.{idx}.{name}"] = tensor.detach().to("cpu").contiguous()
        layers.append(meta)
    return tensors, layers


def _layer_parts(layer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(layer, RaggedLayer):
        parts = {
            "keys": layer.keys,
            "values": layer.values,
            "added_keys": layer.added_keys,
            "added_values": layer.added_values,
        }
        if layer.key_channels is not None:
            parts["key_channels"] = layer.key_channels
        return parts, {"kind": "ragged", "lengths": list(layer.lengths)}
    if isinstance(layer, WindowLayer):
        parts = {"keys": layer.keys, "values": layer.values, "positions": layer.positions}
        seen = layer.cumulative_length
        return parts, {"kind": "window", "window": layer.sliding_window, "cumulative_length": seen}
    if isinstance(layer, ChannelPrunedLayer):
        parts = {"keys": layer.keys, "values": layer.values, "key_channels": layer.key_channels}
        return parts, {"kind": "pruned"}
    if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
        raise KVTrimError(f"A cache layer of type {type(layer).__name__} cannot be saved.")
    parts = {"keys": layer.keys, "values": layer.values}
    if is_sliding(layer):
        return parts, {"kind": "sliding", "cumulative_length": int(layer.cumulative_length)}
    return parts, {"kind": "dense"}


def restore_cache(
    empty: Any, tensors: dict[str, torch.Tensor], layers: list[dict[str, Any]], device: Any
) -> Any:
    """Fill ``empty`` (a new cache laid out for the model) from :func:`cache_tensors`' output."""
    if len(layers) != len(empty.layers):
        raise KVTrimError(f"The saved cache has {len(layers)} layers; this model has {len(empty.layers)}.")
    for idx, meta in enumerate(layers):
        part = {
            name.split(".", 2)[2]: t.to(device)
            for name, t in tensors.items()
            if name.startswith(f"layer.{idx}.")
        }
        kind = meta.get("kind")
        if (kind in ("sliding", "window")) != is_sliding(empty.layers[idx]):
            raise KVTrimError(f"Layer {idx} was saved as {kind!r}, which this model's layer {idx} is not.")
        if kind == "ragged":
            lengths = [int(n) for n in meta["lengths"]]
            if sum(lengths) != part["keys"].shape[0] or len(lengths) != part["added_keys"].shape[1]:
                raise KVTrimError(f"Layer {idx}'s head lengths do not match its tensors.")
            layer = RaggedLayer(part["keys"], part["values"], lengths)
            layer.added_keys, layer.added_values = part["added_keys"], part["added_values"]
            if "key_channels" in part:
                layer.key_channels = part["key_channels"]
            empty.layers[idx] = layer
        elif kind == "window":
            if part["positions"].shape != part["keys"].shape[:3]:
                raise KVTrimError(f"Layer {idx}'s positions do not match its tensors.")
            window, seen = int(meta["window"]), int(meta["cumulative_length"])
            empty.layers[idx] = WindowLayer(part["keys"], part["values"], part["positions"], window, seen)
        elif kind == "pruned":
            empty.layers[idx] = ChannelPrunedLayer(part["keys"], part["values"], part["key_channels"])
        elif kind in ("dense", "sliding"):
            layer = empty.layers[idx]
            layer.lazy_initialization(part["keys"], part["values"])
            layer.keys, layer.values = part["keys"], part["values"]
            if kind == "sliding":
                layer.cumulative_length = int(meta["cumulative_length"])
        else:
            raise KVTrimError(f"Layer {idx} has an unknown kind {kind!r}.")
    return empty
