"""ChunkKV (arXiv 2502.00299): keep whole chunks of text, the same chunks in every head.

Token-level eviction keeps scattered tokens and breaks the phrases they belong to. ChunkKV cuts
the cache into chunks of ``chunk_size`` consecutive tokens (from the start; the last one may be
shorter), scores a chunk by the mean over its tokens of a base score summed over all kv-heads, and
keeps the best whole chunks. The base score is SnapKV's (the paper's and kvpress's usual pairing),
so the observation window is always kept. Every position of a chunk, in every head, gets the
chunk's score: a budget that is a multiple of ``chunk_size`` then selects whole chunks (the engine
breaks the ties inside a chunk by recency, and all heads share one ranking). The paper's
layer-wise index reuse (sharing kept indices across adjacent layers) is not done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.scorers.snapkv import check_snapkv_options, snapkv_scores


def chunk_lengths(seq: int, chunk_size: int, device: torch.device) -> torch.Tensor:
    """(⌈T/c⌉,) float: the length of every chunk of ``chunk_size`` (the last one may be short)."""
    lengths = torch.full((-(-seq // chunk_size),), float(chunk_size), device=device)
    lengths[-1] = seq - chunk_size * (len(lengths) - 1)
    return lengths


def ranks_in_chunks(scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """scores (..., T) -> (..., T) float: each position's rank inside its chunk (0 = the chunk's best)."""
    *lead, seq = scores.shape
    flat = scores.reshape(-1, seq)  # (N, T)
    padded = F.pad(flat, (0, -seq % chunk_size), value=-math.inf).reshape(len(flat), -1, chunk_size)
    ranks = padded.argsort(dim=-1, descending=True).argsort(dim=-1).float()  # (N, C, c)
    return ranks.reshape(len(flat), -1)[:, :seq].reshape(*lead, seq)


def chunk_means(scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """scores: (B, T) -> (B, T), every position holding the mean score of its chunk."""
    seq = scores.shape[-1]
    padded = F.pad(scores, (0, -seq % chunk_size))  # (B, ⌈T/c⌉·c)
    sums = padded.reshape(scores.shape[0], -1, chunk_size).sum(dim=-1)  # (B, ⌈T/c⌉)
    lengths = chunk_lengths(seq, chunk_size, scores.device)  # (⌈T/c⌉,)
    return (sums / lengths).repeat_interleave(chunk_size, dim=-1)[:, :seq]  # (B, T)


@dataclass
class ChunkKV(Scorer):
    """Chunks of ``chunk_size`` tokens ranked by their mean SnapKV score (summed over heads)."""

    name = "chunkkv"
    summary = "Keep whole 20-token chunks, ranked by mean SnapKV score, the same for all heads."
    paper = "arXiv 2502.00299"
    chunk_size: int = 20
    window: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        check_snapkv_options(self.window, self.kernel_size)
        if self.chunk_size < 1:
            raise KVTrimError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}.")

    def score(self, view: LayerView) -> torch.Tensor:
        base = snapkv_scores(view, self.window, self.kernel_size)  # (B, Hkv, T), window +inf
        chunked = chunk_means(base.sum(dim=1), self.chunk_size)  # (B, T)
        return chunked[:, None].expand_as(base).clone()  # (B, Hkv, T)
