"""What a kvtrim cache layer hands to attention in place of its key and value tensors.

transformers' attention modules only pass keys and values along to the registered attention
function (a few read their shape, device or dtype); kvtrim's function (:mod:`kvtrim.attention.interface`)
looks the stand-in's type up in one table to find the kernel that understands it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KeysStandIn:
    """Base of every stand-in: shape, device and dtype of the keys it stands for."""

    keys: torch.Tensor | list[torch.Tensor]

    @property
    def reference(self) -> torch.Tensor:
        """A tensor with the keys' device and dtype."""
        return self.keys  # type: ignore[return-value]

    @property
    def shape(self) -> torch.Size:
        return self.reference.shape

    @property
    def device(self) -> torch.device:
        return self.reference.device

    @property
    def dtype(self) -> torch.dtype:
        return self.reference.dtype


@dataclass
class RaggedKV(KeysStandIn):
    """A ragged layer in two parts: the kept pairs packed head after head, (ΣK_h, D) keys and
    values with the heads' lengths, and the tokens added since, (1, Hkv, n, D) each.

    With pruned key channels (ThinK) head h's keys hold only ``channels[0, h]`` (width Dk).
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: list[int]  # Hkv × K_h
    heads: list[tuple[torch.Tensor, torch.Tensor]]  # Hkv × views (1, 1, K_h, D) of keys and values
    added_keys: torch.Tensor
    added_values: torch.Tensor
    channels: torch.Tensor | None = None  # (1, Hkv, Dk)

    @property
    def shape(self) -> torch.Size:
        n = max(self.lengths) + self.added_keys.shape[2]
        return torch.Size((1, len(self.lengths), n, self.keys.shape[-1]))


@dataclass
class PrunedKeys(KeysStandIn):
    """Keys stored on a subset of their channels (ThinK): (B, Hkv, T, Dk) and the channels (B, Hkv, Dk)."""

    keys: torch.Tensor
    channels: torch.Tensor


@dataclass
class MaskedKV(KeysStandIn):
    """Dense keys/values of a batch of cells with the slots each (row, head) may attend to.

    keys, values: (B, Hkv, L, D); visible: (B, Hkv, L) bool.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor


@dataclass
class WindowKV(KeysStandIn):
    """A sliding-window layer compressed within its window: the kept pairs then the new tokens,
    each with its absolute position, and the window W (a query at t sees pairs at t − W < p ≤ t).

    keys, values: (B, Hkv, L, D); positions: (B, Hkv, L), ascending per head, the last q being
    the current forward's tokens.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    window: int
