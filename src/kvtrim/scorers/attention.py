"""Softmax attention of a few queries over a layer's cache, shared by the attention-based scorers.

SnapKV, TOVA, ChunkKV and observed attention (H2O) all read attention weights. The engine runs the
model with SDPA/FlashAttention, which never exposes them, so they are recomputed here from the
view's post-RoPE queries for only the rows a scorer needs, never as a full T×T matrix.
"""

from __future__ import annotations

import torch

from kvtrim.scorers.base import LayerView


def attention_probs(
    view: LayerView, queries: torch.Tensor, query_positions: torch.Tensor, visible_only: bool = False
) -> torch.Tensor:
    """Causal softmax attention of ``queries`` over every cached key, in float32.

    queries: (B, H, W, D) post-RoPE, at absolute positions ``query_positions`` (W,). A query sees
    the keys at positions ≤ its own, so causality holds inside the current forward as well.
    Returns (B, Hkv, G, W, T): query head h = j·G + g reads kv-head j, as in ``repeat_kv``.
    ``visible_only`` leaves out the keys after the last query, which none of them sees:
    (B, Hkv, G, W, T') with T' the count of keys at positions ≤ max(query_positions).
    """
    bsz, n_kv, seq, dim = view.keys.shape
    key_pos = view.key_positions.to(queries.device)  # (T,) ascending
    query_pos = query_positions.to(queries.device)  # (W,)
    keys = view.keys
    if visible_only:
        seq = int(torch.searchsorted(key_pos, query_pos.max(), right=True))
        keys, key_pos = keys[:, :, :seq], key_pos[:seq]
    q = queries.float().reshape(bsz, n_kv, -1, dim)  # (B, Hkv, G·W, D)
    logits = (q @ keys.float().transpose(-1, -2)).mul_(view.scaling)  # (B, Hkv, G·W, T)
    logits = logits.view(bsz, n_kv, view.group_size, -1, seq)  # (B, Hkv, G, W, T)
    # only keys after the first query can be in some query's future: mask just those columns
    cut = int(torch.searchsorted(key_pos, query_pos.min(), right=True))
    if cut < seq:
        hidden = key_pos[None, cut:] > query_pos[:, None]  # (W, T − cut), True = in the future
        logits[..., cut:].masked_fill_(hidden, -torch.inf)
    return torch.softmax(logits, dim=-1)  # (B, Hkv, G, W, T)
