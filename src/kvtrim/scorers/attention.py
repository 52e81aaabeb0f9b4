"""Softmax attention of a few queries over a layer's cache, shared by the attention-based scorers.

SnapKV, TOVA, ChunkKV and observed attention (H2O) all read attention weights. The engine runs the
model with SDPA/FlashAttention, which never exposes them, so they are recomputed here from the
view's post-RoPE queries for only the rows a scorer needs, never as a full T×T matrix.
"""

from __future__ import annotations

import torch

from kvtrim.scorers.base import LayerView


def attention_probs(view: LayerView, queries: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of ``queries`` over every cached key, in float32.

    queries: (B, H, W, D) post-RoPE, at absolute positions ``query_positions`` (W,). A query sees
    the keys at positions ≤ its own, so causality holds inside the current forward as well.
    Returns (B, Hkv, G, W, T): query head h = j·G + g reads kv-head j, as in ``repeat_kv``.
    """
    bsz, n_kv, seq, dim = view.keys.shape
    q = queries.float().reshape(bsz, n_kv, view.group_size, -1, dim)  # (B, Hkv, G, W, D)
    logits = view.scaling * torch.einsum("bjgwd,bjtd->bjgwt", q, view.keys.float())  # (B, Hkv, G, W, T)
    key_pos = view.key_positions.to(logits.device)  # (T,) ascending
    query_pos = query_positions.to(logits.device)  # (W,)
    # only keys after the first query can be in some query's future: mask just those columns
    cut = int(torch.searchsorted(key_pos, query_pos.min(), right=True))
    if cut < seq:
        hidden = key_pos[None, cut:] > query_pos[:, None]  # (W, T − cut), True = in the future
        logits[..., cut:].masked_fill_(hidden, -torch.inf)
    return torch.softmax(logits, dim=-1)  # (B, Hkv, G, W, T)
