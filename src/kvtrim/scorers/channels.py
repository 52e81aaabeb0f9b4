"""ThinK (arXiv 2407.21018): which key channels the queries actually use.

Token eviction shortens the cache along T; ThinK shortens it along the head dimension. A key
channel c contributes Σ_c q_c·k_c to every attention logit, and the size of that contribution over
the observation window W (the last context queries) is bounded by ‖Q_W[:, c]‖·‖K[:, c]‖ — the
Frobenius norm of the channel's slice of QKᵀ. Channels with a small product barely move any logit,
so per layer and kv-head the ``D − floor(ratio·D)`` channels with the largest product are kept
(the queries of a GQA group are pooled: their window rows are stacked). The product is computed on
the keys actually stored, i.e. after token eviction, so ThinK composes with any scorer and budget.
The cache layer that stores the pruned keys is :class:`kvtrim.cache.channels.ChannelPrunedLayer`.
"""

from __future__ import annotations

import torch

from kvtrim.core.ratios import n_keep_channels
from kvtrim.core.selection import top_indices


def channel_scores(queries: torch.Tensor, key_norms: torch.Tensor) -> torch.Tensor:
    """‖Q_W[:, c]‖·‖K[:, c]‖ per kv-head and channel.

    queries: (B, H, W, D) post-RoPE window queries; key_norms: (B, Hkv, D), ‖K[:, c]‖ over the
    stored keys (a ragged layer's heads store different tokens) -> (B, Hkv, D).
    """
    bsz, n_kv, dim = key_norms.shape
    grouped = queries.float().reshape(bsz, n_kv, -1, dim)  # (B, Hkv, G·W, D): head h = j·G + g
    return grouped.norm(dim=2) * key_norms.float()  # (B, Hkv, D)


def kept_channels(queries: torch.Tensor, key_norms: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the kept channels, sorted: (B, Hkv, D_kept)."""
    return top_indices(channel_scores(queries, key_norms), n_keep_channels(key_norms.shape[-1], ratio))
