"""One way to watch a model's attention layers: PyTorch forward hooks, installed and always removed.

Per layer, a hook on the query projection keeps its output (so nothing has to recompute the
queries: that would cost ~8% of a prefill) and a hook on the attention module calls back once the
layer's attention ran, with the call's keyword arguments and that projection output. The engine
compresses from it, calibration measures from it. Standard PyTorch seams, no monkeypatching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: (layer index, attention module, its call's keyword arguments, the query projection's output or None)
AttentionCallback = Callable[[int, nn.Module, dict[str, Any], "torch.Tensor | None"], None]
#: (layer index, the query projection's output (B, T, ≥ H·D))
ProjectionCallback = Callable[[int, torch.Tensor], None]


@contextmanager
def attention_hooks(
    layers: Sequence[tuple[nn.Module, nn.Module]],
    on_attention: AttentionCallback | None = None,
    on_projection: ProjectionCallback | None = None,
) -> Iterator[None]:
    """Hook every ``(attention module, query projection)`` pair; hooks are removed on exit, even if
    the body raises. ``on_attention`` sees the projection output of the same forward; positional
    arguments of the attention call reach it as ``hidden_states``."""
    stash: dict[int, torch.Tensor] = {}
    handles: list[Any] = []
    try:
        for idx, (attention, projection) in enumerate(layers):
            keep = on_attention is not None
            handles.append(projection.register_forward_hook(_on_projection(idx, stash, on_projection, keep)))
            if on_attention is not None:
                handles.append(
                    attention.register_forward_hook(_on_attention(idx, stash, on_attention), with_kwargs=True)
                )
        yield
    finally:
        for handle in handles:
            handle.remove()
        stash.clear()


def _on_projection(idx: int, stash: dict[int, torch.Tensor], callback: ProjectionCallback | None, keep: bool):
    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if callback is not None:
            callback(idx, output)
        if keep:
            stash[idx] = output.detach()

    return hook


def _on_attention(idx: int, stash: dict[int, torch.Tensor], callback: AttentionCallback):
    def hook(module: nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
        if args and "hidden_states" not in kwargs:
            kwargs = {"hidden_states": args[0], **kwargs}
        callback(idx, module, kwargs, stash.pop(idx, None))

    return hook
