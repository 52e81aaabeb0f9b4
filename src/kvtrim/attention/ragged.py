"""Attention over a ragged layer, each KV head over its own kept pairs (see
:class:`kvtrim.cache.ragged.RaggedLayer`).

On CPU, and for multi-token forwards, one ``sdpa`` call per KV head. On CUDA in half precision, a
decoding step runs as one call of torch's variable-length flash kernel for all heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvtrim.attention.dense import suffix_causal_mask
from kvtrim.attention.standins import RaggedKV


def ragged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: RaggedKV,
    value: RaggedKV,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    **kwargs: Any,
) -> torch.Tensor:
    """query: (B, H, q, D) -> (B, q, H, D). Head h's queries meet only head h's keys (on its kept
    channels when ThinK pruned them); the new tokens are causal, the kept context all visible."""
    kernel = _varlen_kernel_for(query, key)
    if kernel is not None:
        return ragged_varlen_attention(query, key, value, scaling, kernel)
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
        mask = suffix_causal_mask(q_len, k.shape[2], q.device) if q_len > 1 else None
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        )
    out = torch.cat(outputs, dim=1)  # (B, H, q, D)
    return out.transpose(1, 2).contiguous()


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
        from torch.nn.attention.varlen import varlen_attn  # a CUDA-only kernel of recent torch
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


def reference_varlen_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None,
    window_size: tuple[int, int],
    enable_gqa: bool,
) -> torch.Tensor:
    """A plain stand-in for ``varlen_attn`` with its signature, for decoding steps (one query
    token per sequence, so no mask): each packed sequence attended on its own, GQA by repetition.
    The CUDA kernel runs on GPUs only; this lets the packing be checked anywhere."""
    if window_size != (-1, -1) or not enable_gqa:
        raise ValueError("the reference kernel covers decoding steps only (no mask, GQA)")
    out = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)  # (G, q, D)
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1).expand(qs.shape[0], -1, -1)  # (G, K, D)
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1).expand(qs.shape[0], -1, -1)
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1))
    return torch.cat(out)  # (Σq, G, D)
