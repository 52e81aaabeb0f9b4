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
    """Per-head keys and values: lists of Hkv tensors of shape (B, K_h, D).

    With pruned key channels (ThinK) head h's keys are (B, K_h, Dk) over ``channels[:, h]``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    channels: torch.Tensor | None = None  # (B, Hkv, Dk)

    @property
    def reference(self) -> torch.Tensor:
        return self.keys[0]

    @property
    def shape(self) -> torch.Size:
        first = self.keys[0]
        return torch.Size(
            (first.shape[0], len(self.keys), max(k.shape[1] for k in self.keys), first.shape[-1])
        )


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
