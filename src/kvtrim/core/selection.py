"""Which indices the top scores are: ties between scores go to the most recent position, so the
same inputs always give the same kept set."""

from __future__ import annotations

import torch


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per (batch, head), sorted by position.

    scores: (B, H, T) -> (B, H, k). Deterministic: among equal scores the most recent position wins.
    Each score and its position form one int64 key — the float's bits mapped to an order-preserving
    integer, the position below them — so a partial top-k (no full sort) finds the kept set, and
    no two keys tie.
    """
    seq = scores.shape[-1]
    keys = (_ordered_bits(scores).to(torch.int64) << 32) | torch.arange(seq, device=scores.device)
    return keys.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _ordered_bits(scores: torch.Tensor) -> torch.Tensor:
    """int32 whose order is the float32 scores' order (equal scores, -0.0 and 0.0 included, equal)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: flip all but the sign bit
