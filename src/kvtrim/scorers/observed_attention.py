"""Observed attention, the score of H2O (arXiv 2306.14048): keep the heavy hitters.

A few tokens collect most of the attention mass, and they stay important. H2O accumulates the
attention each key receives; after prefill that is the attention from every context query. As in
NVIDIA kvpress, the sum is divided by the number of queries that could see the key (causal:
query i sees keys ≤ i), so that early keys are not favoured just for being seen more often —
the score is the *mean* attention a key received — then averaged over the GQA group.

The attention matrix is recomputed from the queries block by block (``block_size`` query rows at
a time), each block over the keys it can see only (its causal prefix), so memory grows as
H·block_size·T, never as T², and the work is the causal half of the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.attention import attention_probs
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class ObservedAttention(Scorer):
    """Mean attention each key received from the context's queries (H2O's heavy hitters)."""

    name = "observed-attention"
    summary = "H2O: mean attention each key received during prefill (computed blockwise)."
    paper = "arXiv 2306.14048"
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise KVTrimError(f"block_size must be a positive number of queries, got {self.block_size}.")

    def score(self, view: LayerView) -> torch.Tensor:
        bsz, n_kv, seq, _ = view.keys.shape
        queries = view.queries(rotated=True)  # (B, H, Tq, D)
        query_pos = view.query_positions.to(queries.device)  # (Tq,), increasing
        total = torch.zeros(bsz, n_kv, seq, device=queries.device)  # (B, Hkv, T)
        for start in range(0, queries.shape[2], self.block_size):
            stop = start + self.block_size
            block = queries[:, :, start:stop]  # (B, H, b, D)
            probs = attention_probs(
                view, block, query_pos[start:stop], visible_only=True
            )  # (B, Hkv, G, b, T')
            total[..., : probs.shape[-1]] += probs.sum(dim=(2, 3))  # (B, Hkv, T')
        key_pos = view.key_positions.to(queries.device)  # (T,)
        # queries at a position ≥ the key's: all of them past the first such query
        seen_by = len(query_pos) - torch.searchsorted(query_pos, key_pos, side="left")  # (T,)
        return total / (seen_by.clamp_min(1) * view.group_size)
