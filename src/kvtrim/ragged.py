"""Ragged cache layers: each KV head stores only its own kept pairs.

Head-adaptive and threshold budgets keep a different number of pairs per head. Padding every head
to the longest and masking (what other libraries do) frees no memory; here each head owns a tensor
of exactly its kept pairs, and attention runs per KV head over its own keys.

The seam is transformers' ``AttentionInterface``: kvtrim registers ``kvtrim_sdpa``, which is plain
``sdpa`` for ordinary tensors and a per-head loop for a :class:`RaggedKV`. It also rebuilds the
causal mask when a layer's length differs from the one the model's mask was made for (per-layer
budgets such as pyramid): the layout is always [kept context | new tokens].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvtrim.channels import PrunedKeys, select_channels, select_query_channels
from kvtrim.masked import MaskedKV, masked_heads_attention

ATTENTION_NAME = "kvtrim_sdpa"


@dataclass
class RaggedKV:
    """Per-head keys and values: lists of Hkv tensors of shape (B, K_h, D).

    With pruned key channels (ThinK) head h's keys are (B, K_h, Dk) over ``channels[:, h]``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    channels: torch.Tensor | None = None  # (B, Hkv, Dk)

    # The attention modules only pass these along; a few read the shape or device.
    @property
    def shape(self) -> torch.Size:
        first = self.keys[0]
        return torch.Size(
            (first.shape[0], len(self.keys), max(k.shape[1] for k in self.keys), first.shape[-1])
        )

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype


class RaggedLayer(CacheLayerMixin):
    """A cache layer whose heads hold different numbers of pairs (B = 1)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, head_keys: list[torch.Tensor], head_values: list[torch.Tensor]):
        super().__init__()
        self.head_keys = head_keys  # Hkv × (B, K_h, D), or (B, K_h, Dk) once channels are pruned
        self.head_values = head_values
        self.key_channels: torch.Tensor | None = None  # (B, Hkv, Dk) kept key channels (ThinK)
        self.device = head_keys[0].device
        self.is_initialized = True

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> RaggedLayer:
        """keys, values: (1, Hkv, T, D); mask: (1, Hkv, T) -> one compact tensor per head."""
        if keys.shape[0] != 1:
            raise NotImplementedError("ragged (per-head) budgets support batch size 1")
        head_keys, head_values = [], []
        for head in range(keys.shape[1]):
            kept = mask[0, head].nonzero().squeeze(-1)  # (K_h,) sorted positions
            head_keys.append(keys[:, head, kept].contiguous())  # (1, K_h, D)
            head_values.append(values[:, head, kept].contiguous())
        return cls(head_keys, head_values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append new (B, Hkv, q, D) states to every head; returns a :class:`RaggedKV`."""
        if self.key_channels is not None:
            key_states = select_channels(key_states, self.key_channels)  # (B, Hkv, q, Dk)
        self.head_keys = [torch.cat([k, key_states[:, h]], dim=1) for h, k in enumerate(self.head_keys)]
        self.head_values = [torch.cat([v, value_states[:, h]], dim=1) for h, v in enumerate(self.head_values)]
        ragged = RaggedKV(self.head_keys, self.head_values, self.key_channels)
        return ragged, ragged  # the attention function reads .keys of the first, .values of the second

    def key_norms(self) -> torch.Tensor:
        """‖K[:, c]‖ of every head's stored keys: (B, Hkv, D)."""
        return torch.stack([k.float().norm(dim=1) for k in self.head_keys], dim=1)

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Keep only ``channels`` (B, Hkv, Dk) of every head's keys, now and for later tokens."""
        self.head_keys = [
            select_channels(k[:, None], channels[:, h : h + 1])[:, 0]  # (B, K_h, Dk)
            for h, k in enumerate(self.head_keys)
        ]
        self.key_channels = channels

    def head_lengths(self) -> list[int]:
        return [int(k.shape[1]) for k in self.head_keys]

    def get_seq_length(self) -> int:
        return max(self.head_lengths())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        tensors = [*self.head_keys, *self.head_values]
        if self.key_channels is not None:
            tensors.append(self.key_channels)
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def n_pairs(self) -> int:
        return sum(self.head_lengths())

    def reset(self) -> None:
        raise NotImplementedError("a ragged layer cannot be reset; build a new cache")


def _suffix_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(q, kv) boolean mask for [kept context | q new tokens]: context visible, new tokens causal."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return cols <= kv_len - q_len + rows


def kvtrim_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | RaggedKV,
    value: torch.Tensor | RaggedKV,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``sdpa`` that also understands ragged heads, per-layer cache lengths and cell batches.

    query: (B, H, q, D). Returns (B, q, H, D) like transformers' sdpa. Keys stored on a subset of
    their channels (:class:`~kvtrim.channels.PrunedKeys`, or a ragged layer's ``channels``) meet
    the same channels of the query: q·k over the kept channels, scaled as the full head would be.
    """
    if isinstance(key, MaskedKV):  # a batch of cells (kvtrim.cell_batch): its own per-head mask
        assert isinstance(value, MaskedKV)
        return masked_heads_attention(query, key, value, scaling), None
    if isinstance(key, PrunedKeys):
        query = select_query_channels(query, key.channels)  # (B, H, q, Dk)
        key = key.keys  # (B, Hkv, T, Dk)
    if not isinstance(key, RaggedKV):
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = _suffix_causal_mask(query.shape[2], key.shape[-2], query.device)[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    assert isinstance(value, RaggedKV)
    kernel = _varlen_kernel_for(query, key)
    if kernel is not None:
        return ragged_varlen_attention(query, key, value, scaling, kernel), None
    n_kv = len(key.keys)
    group = query.shape[1] // n_kv
    q_len = query.shape[2]
    outputs = []
    for head in range(n_kv):
        q = query[:, head * group : (head + 1) * group]  # (B, G, q, D)
        if key.channels is not None:
            q = q[..., key.channels[0, head]]  # (B, G, q, Dk), B = 1
        k = key.keys[head][:, None].expand(-1, group, -1, -1)  # (B, G, K_h, D)
        v = value.values[head][:, None].expand(-1, group, -1, -1)
        mask = _suffix_causal_mask(q_len, k.shape[2], q.device) if q_len > 1 else None
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        )
    out = torch.cat(outputs, dim=1)  # (B, H, q, D)
    return out.transpose(1, 2).contiguous(), None


def _varlen_kernel_for(query: torch.Tensor, key: RaggedKV) -> Callable | None:
    """torch's variable-length flash kernel when it can run here, else None (the per-head loop).

    Used for decoding steps (one query token, which sees every cached pair, so no causal mask and
    no question of how a kernel aligns it) on CUDA in half precision with B = 1 and full-width
    keys; multi-token forwards, CPU, float32 and ThinK's pruned keys take the loop.
    """
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return None
    if key.channels is not None or query.shape[0] != 1 or query.shape[2] != 1:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def ragged_varlen_attention(
    query: torch.Tensor, key: RaggedKV, value: RaggedKV, scaling: float | None, kernel: Callable
) -> torch.Tensor:
    """Every kv-head of a ragged layer in one variable-length attention call (B = 1).

    Each kv-head is one sequence of a packed batch: its G query heads (GQA inside the kernel) over
    its own K_h pairs. For one query token (decoding) no mask is needed; longer queries are
    causal aligned bottom-right (flash-attention's convention), the [kept | new] suffix layout.
    ``kernel`` has the signature of ``torch.nn.attention.varlen.varlen_attn``.
    query: (1, H, q, D) -> (1, q, H, D), like sdpa's output after its transpose.
    """
    _, n_heads, q_len, dim = query.shape
    n_kv = len(key.keys)
    group = n_heads // n_kv
    packed_q = query[0].reshape(n_kv, group, q_len, dim).transpose(1, 2).reshape(n_kv * q_len, group, dim)
    packed_k = torch.cat([k[0] for k in key.keys])[:, None]  # (ΣK_h, 1, D)
    packed_v = torch.cat([v[0] for v in value.values])[:, None]  # (ΣK_h, 1, Dv)
    lengths = torch.tensor([k.shape[1] for k in key.keys], device=query.device)  # (Hkv,)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (Hkv + 1,)
    cu_q = torch.arange(0, (n_kv + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
    out = kernel(
        packed_q,  # (Hkv·q, G, D): row h·q + t is head h's query at t
        packed_k,
        packed_v,
        cu_q,
        cu_k,
        q_len,
        int(lengths.max()),
        scale=scaling,
        window_size=(-1, -1) if q_len == 1 else (-1, 0),
        enable_gqa=True,
    )  # (Hkv·q, G, Dv)
    return out.reshape(n_kv, q_len, group, -1).transpose(0, 1).reshape(1, q_len, n_heads, -1)


def register() -> None:
    """Make ``kvtrim_sdpa`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvtrim_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model: nn.Module) -> None:
    """Switch ``model`` to ``kvtrim_sdpa``: identical to sdpa on ordinary caches, so it stays on."""
    register()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
