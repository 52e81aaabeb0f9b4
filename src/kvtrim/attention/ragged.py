"""Attention over a ragged layer, each KV head over its own kept pairs (see
:class:`kvtrim.cache.ragged.RaggedLayer`).

The layer hands over two parts: the kept pairs, packed head after head (ΣK_h, D), and the tokens
added since (question, decoded tokens), dense (1, Hkv, n, D) since every head got all of them.
Each part is attended on its own and the two merged by log-sum-exp
(:mod:`kvtrim.attention.partial`), so a decoding step never copies the kept pairs (a dense
layer's concatenation copies its whole cache every step). The kept part runs one kernel call per
KV head over views of the packed tensor, or, on CUDA in half precision, one call of torch's
variable-length flash kernel for all heads; the added part is one call for all heads, causal.
On CPU in float32 a compiled kernel (:mod:`kvtrim.attention.cpu_kernels`) does both parts of every
head in one call instead, where it could be built.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvtrim.attention.channels import select_query_channels
from kvtrim.attention.cpu_kernels import cpu_kernels
from kvtrim.attention.dense import suffix_causal_mask
from kvtrim.attention.partial import Partial, attend, attend_written_out, merge
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
    """query: (1, H, q, D) -> (1, q, H, Dv). Head h's queries meet only head h's keys (on its kept
    channels when ThinK pruned them); the kept pairs are all visible, the added tokens causal."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling  # the full head's, also for pruned keys
    kernel = _varlen_kernel_for(query, key)
    if kernel is None and (compiled := _compiled_kernel_for(query, key)) is not None:
        return compiled_attention(query, key, scale, compiled)
    kept = kept_part_varlen(query, key, scale, kernel) if kernel is not None else kept_part(query, key, scale)
    added = added_part(query, key, scale)
    return merge(kept, added).transpose(1, 2).contiguous()


def compiled_attention(
    query: torch.Tensor, key: RaggedKV, scale: float, kernel: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """Both parts, every head, in one call of the compiled CPU kernel (:mod:`.cpu_kernels`): the
    softmax runs over each head's kept pairs and the visible added tokens together, so there is
    nothing to merge. query (1, H, q, D) -> (1, q, H, D)."""
    out = kernel(
        query[0].contiguous(),  # (H, q, D)
        key.keys,  # (ΣK_h, D)
        key.values,
        head_offsets(tuple(key.lengths), key.keys.device, torch.int64),  # (Hkv + 1,)
        key.added_keys[0].contiguous(),  # (Hkv, n, D), the queries' own tokens last
        key.added_values[0].contiguous(),
        scale,
    )  # (H, q, D)
    return out.transpose(0, 1)[None]  # (1, q, H, D)


#: the compiled kernel takes forwards of up to this many tokens (decoding steps); longer ones
#: (a question's prefill) go to the flash kernel per head, whose products are matrix products
COMPILED_MAX_QUERIES = 4


def _compiled_kernel_for(query: torch.Tensor, key: RaggedKV) -> Callable[..., torch.Tensor] | None:
    """The compiled kernel where it applies (CPU, float32, a decoding-sized forward, full-width
    keys as wide as the values) and could be built; else None (the portable path)."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or key.keys.dtype != torch.float32:
        return None
    if query.shape[2] > COMPILED_MAX_QUERIES:
        return None
    if key.channels is not None or query.shape[0] != 1 or not key.keys.is_contiguous():
        return None
    if not (query.shape[-1] == key.keys.shape[-1] == key.values.shape[-1]) or not key.values.is_contiguous():
        return None
    kernels = cpu_kernels()
    return None if kernels is None else kernels.ragged_attention


@functools.lru_cache(maxsize=1024)
def head_offsets(lengths: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(Hkv + 1,): where each head's pairs start in the packed tensors, then their end (what the
    compiled kernel and the variable-length kernel's ``cu_seqlens`` take); cached per layout."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=device)


def kept_part(query: torch.Tensor, key: RaggedKV, scale: float) -> Partial:
    """Every head over its own kept pairs, one call per KV head on views of the packed tensors."""
    outs, lses = [], []
    groups = query.split(query.shape[1] // len(key.lengths), dim=1)  # Hkv × (1, G, q, D)
    for head, (q, (head_keys, head_values)) in enumerate(zip(groups, key.heads, strict=True)):
        if key.channels is not None:
            q = q[..., key.channels[0, head]]  # (1, G, q, Dk)
        if head_keys.shape[2] == 0:  # a head that kept nothing: no share of the softmax
            outs.append(q.new_zeros(*q.shape[:3], head_values.shape[-1]))
            lses.append(q.new_full(q.shape[:3], -torch.inf, dtype=torch.float32))
            continue
        part = attend(q, head_keys, head_values, scale)
        outs.append(part.out)
        lses.append(part.lse)
    return Partial(torch.cat(outs, dim=1), torch.cat(lses, dim=1))  # (1, H, q, Dv), (1, H, q)


def added_part(query: torch.Tensor, key: RaggedKV, scale: float) -> Partial:
    """Every head over the tokens added since compression (the current ones included), causal."""
    if key.channels is not None:
        query = select_query_channels(query, key.channels)  # (1, H, q, Dk)
    q_len, n_added = query.shape[2], key.added_keys.shape[2]
    visible = suffix_causal_mask(q_len, n_added, query.device) if q_len > 1 else None
    return attend(query, key.added_keys, key.added_values, scale, visible)


def _varlen_kernel_for(query: torch.Tensor, key: RaggedKV) -> Callable | None:
    """torch's variable-length flash kernel when it can run here, else None (the per-head loop).

    CUDA in half precision with full-width keys, every head holding at least one kept pair; CPU,
    float32 and ThinK's pruned keys take the loop.
    """
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return None
    if key.channels is not None or query.shape[0] != 1 or min(key.lengths) == 0:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn  # a CUDA-only kernel of recent torch
    except ImportError:
        return None
    return varlen_attn


def kept_part_varlen(query: torch.Tensor, key: RaggedKV, scale: float, kernel: Callable) -> Partial:
    """Every kv-head's kept pairs in one variable-length attention call (B = 1).

    Each kv-head is one sequence of a packed batch: its G query heads (GQA inside the kernel) over
    its own K_h pairs, the layer's packed tensors as they are (no copy). The kept pairs are visible
    to every new token, so no mask, whatever q. ``kernel`` has the signature of
    ``torch.nn.attention.varlen.varlen_attn``. query: (1, H, q, D) -> (1, H, q, Dv), (1, H, q).
    """
    from torch.nn.attention.varlen import AuxRequest

    _, n_heads, q_len, dim = query.shape
    n_kv = len(key.lengths)
    group = n_heads // n_kv
    packed_q = query[0].reshape(n_kv, group, q_len, dim).transpose(1, 2).reshape(n_kv * q_len, group, dim)
    cu_k = head_offsets(tuple(key.lengths), query.device, torch.int32)  # (Hkv + 1,)
    cu_q = torch.arange(0, (n_kv + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
    out, lse = kernel(
        packed_q,  # (Hkv·q, G, D): row h·q + t is head h's query at t
        key.keys[:, None],  # (ΣK_h, 1, D)
        key.values[:, None],
        cu_q,
        cu_k,
        q_len,
        max(key.lengths),
        return_aux=AuxRequest(lse=True),
        scale=scale,
        window_size=(-1, -1),
        enable_gqa=True,
    )  # (Hkv·q, G, Dv); lse (G, Hkv·q): the flash kernel's lse is heads first
    out = out.reshape(n_kv, q_len, group, -1).permute(0, 2, 1, 3).reshape(1, n_heads, q_len, -1)
    lse = lse.reshape(group, n_kv, q_len).transpose(0, 1).reshape(1, n_heads, q_len)
    return Partial(out, lse.float())


def reference_varlen_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux: Any = None,
    scale: float | None,
    window_size: tuple[int, int],
    enable_gqa: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A plain stand-in for ``varlen_attn`` with its signature and its outputs' layouts (out
    (Σq, H, Dv), lse (H, Σq)), without masks (every packed sequence's queries see all its keys), GQA
    by broadcasting. The CUDA kernel runs on GPUs only; this lets the packing be checked anywhere."""
    if window_size != (-1, -1) or not enable_gqa:
        raise ValueError("the reference kernel covers unmasked attention with GQA only")
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]  # (1, G, q, D)
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]  # (1, 1, K, D)
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        part = attend_written_out(qs, ks, vs, qs.shape[-1] ** -0.5 if scale is None else scale)
        outs.append(part.out[0].transpose(0, 1))  # (q, G, Dv)
        lses.append(part.lse[0].transpose(0, 1))  # (q, G)
    out = torch.cat(outs).to(q.dtype)  # (Σq, G, Dv)
    lse = torch.cat(lses).T.contiguous()  # (G, Σq), heads first as the flash kernel returns it
    return (out, lse) if return_aux is not None and return_aux.lse else out
