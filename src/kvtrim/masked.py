"""Dense keys with a per-(row, head) visibility mask, and the attention that honours it.

Used by :mod:`kvtrim.cell_batch` to stack cells of different kept sets as rows of one batch;
kept apart (torch only) so that the attention function in :mod:`kvtrim.ragged` can dispatch on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KeysStandIn:
    """What a cache layer hands to attention in place of a key tensor (``self.keys`` inside).

    The attention modules only pass it along to kvtrim's attention function; a few read its
    shape, device or dtype, which are the inner keys'.
    """

    keys: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.keys.shape

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype


@dataclass
class MaskedKV(KeysStandIn):
    """Dense keys/values of a batch of cells with the slots each (row, head) may attend to.

    keys, values: (B, Hkv, L, D); visible: (B, Hkv, L) bool.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor


def masked_heads_attention(
    query: torch.Tensor, key: MaskedKV, value: MaskedKV, scaling: float | None
) -> torch.Tensor:
    """Attention of every (row, head) over its visible slots; the new tokens are causal.

    query: (B, H, q, D) -> (B, q, H, D), like sdpa's output after its transpose. The G query heads
    of a KV head share its keys without copying them: (B, Hkv, G·q, D) queries against
    (B, Hkv, L, D) keys, with the mask (B, Hkv, G·q, L).
    """
    batch, n_heads, q_len, dim = query.shape
    n_kv, length = key.keys.shape[1], key.keys.shape[2]
    group = n_heads // n_kv
    rows = torch.arange(q_len, device=query.device)[:, None]
    causal = torch.arange(length, device=query.device)[None, :] <= length - q_len + rows  # (q, L)
    mask = key.visible[:, :, None, :] & causal[None, None]  # (B, Hkv, q, L)
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, n_kv, group * q_len, length)
    grouped = query.reshape(batch, n_kv, group * q_len, dim)  # head h·G + g, token t -> row g·q + t
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key.keys, value.values, attn_mask=mask, scale=scaling
    )  # (B, Hkv, G·q, Dv)
    return out.reshape(batch, n_heads, q_len, -1).transpose(1, 2).contiguous()
