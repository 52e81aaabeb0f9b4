"""Which indices the top scores are: ties between scores go to the most recent position, so the
same inputs always give the same kept set."""

from __future__ import annotations

import torch


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per (batch, head), sorted by position.

    scores: (B, H, T) -> (B, H, k). Deterministic: among equal scores the most recent position wins.
    """
    seq = scores.shape[-1]
    flipped = scores.float().flip(-1)  # position T-1 first, so a stable sort prefers recent ties
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices[..., :k]
    return (seq - 1 - order).sort(dim=-1).values
