"""Entropy-gated ChunkKV: whole chunks where attention is spread out, only the peaks where it is not.

ChunkKV keeps whole chunks so that phrases survive; but a chunk whose attention falls on one or
two tokens (a name in a sentence of filler) spends most of its share on pairs nobody reads. This
variant measures each chunk's normalised entropy H = −Σ p log p / log n of its tokens' base scores
(p = score / chunk sum, n = tokens in the chunk). A chunk with H ≥ ``entropy_gate`` is kept whole as
in ChunkKV; one below the gate keeps only its top ``peak_share`` of tokens at the chunk's rank, and
its other tokens drop below every chunk, so the budget they free goes to the next chunks in line.
A chunk holding part of the observation window (+inf) is never gated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView
from kvtrim.scorers.chunkkv import ChunkKV, chunk_lengths, chunk_means, ranks_in_chunks
from kvtrim.scorers.snapkv import snapkv_scores


def chunk_entropy(scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """scores: (B, T), finite and >= 0 -> (B, ⌈T/c⌉) normalised entropy of each chunk (1 for a
    one-token chunk or an all-zero one: nothing to gate)."""
    seq = scores.shape[-1]
    padded = F.pad(scores, (0, -seq % chunk_size)).reshape(scores.shape[0], -1, chunk_size)  # (B, C, c)
    lengths = chunk_lengths(seq, chunk_size, scores.device)  # (C,)
    totals = padded.sum(dim=-1, keepdim=True)  # (B, C, 1)
    p = padded / totals.clamp_min(torch.finfo(scores.dtype).tiny)  # (B, C, c); padding is 0
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    entropy = -plogp.sum(dim=-1) / lengths.clamp_min(2).log()  # (B, C)
    return torch.where((lengths > 1) & (totals[..., 0] > 0), entropy, torch.ones_like(entropy))


def chunk_peaks(scores: torch.Tensor, chunk_size: int, share: float) -> torch.Tensor:
    """(B, T) bool: the top ⌈share·n⌉ tokens of every chunk by score (n its length)."""
    lengths = chunk_lengths(scores.shape[-1], chunk_size, scores.device)  # (C,)
    quota = (share * lengths).ceil().clamp_min(1).repeat_interleave(chunk_size)[: scores.shape[-1]]  # (T,)
    return ranks_in_chunks(scores, chunk_size) < quota


@dataclass
class EntropyGatedChunkKV(ChunkKV):
    """ChunkKV whose low-entropy chunks keep only their peaks, the freed budget going to more chunks."""

    name = "chunkkv-entropy"
    summary = "ChunkKV; chunks whose attention is peaked (low entropy) keep only their top tokens."
    paper = "arXiv 2502.00299 (gated)"
    entropy_gate: float = 0.5
    peak_share: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.entropy_gate <= 1.0:
            raise KVTrimError(f"entropy_gate is a normalised entropy in [0, 1], got {self.entropy_gate}.")
        if not 0.0 < self.peak_share <= 1.0:
            raise KVTrimError(f"peak_share must be in (0, 1], got {self.peak_share}.")

    def score(self, view: LayerView) -> torch.Tensor:
        base = snapkv_scores(view, self.window, self.kernel_size).sum(dim=1)  # (B, T), window +inf
        finite = base.masked_fill(torch.isinf(base), 0.0)  # (B, T)
        ranked = chunk_means(base, self.chunk_size)  # (B, T); window chunks +inf
        gated = (chunk_entropy(finite, self.chunk_size) < self.entropy_gate).repeat_interleave(
            self.chunk_size, dim=-1
        )[:, : base.shape[-1]]  # (B, T)
        dropped = gated & ~chunk_peaks(finite, self.chunk_size, self.peak_share) & ~torch.isinf(ranked)
        below_all = finite - finite.amax(dim=-1, keepdim=True) - 1.0  # (B, T) < 0 <= every chunk mean
        chunked = torch.where(dropped, below_all, ranked)  # (B, T)
        return chunked[:, None].expand(-1, view.n_kv_heads, -1).clone()  # (B, Hkv, T)
