"""LagKV (arXiv 2504.04704): judge each partition of the cache against the one that follows it.

After ``n_sink`` attention sinks, the cache is cut into partitions of ``lag_size`` tokens. The
keys and values of a partition are min-max normalised per channel with the min and max of the
*next* partition (the "lag" reference), and a token's score is the standard deviation over
channels of its normalised key, and likewise of its value: tokens that stand out from what comes
next carry information the later context does not repeat. No queries, no attention weights.

Formulation followed: NVIDIA kvpress ``LagKVPress`` (same as the authors' ``lag_kv.py`` except
for defaults and the K/V weighting): std with Bessel's correction, softmax of each std within its
partition, score = (softmax_K + softmax_V) / 2, then — unless ``cross_scoring`` — replaced by its
rank within the partition divided by ``lag_size``, so that a uniform budget takes the same share
of every partition, as the paper's per-partition top-k does. Defaults are kvpress's (4 sinks,
partitions of 128); the paper's code uses 16 and 1024.

Kept unconditionally: the sinks (+inf), and the last full partition plus the incomplete tail,
which have no complete next partition to be judged against. The tail scores 2 — above every
partition score (≤ 1) but below the sinks — so that when the budget cannot hold sinks *and* tail
the sinks win and the tail keeps its most recent tokens (kvpress gives both the same score and
lets ``topk`` choose). With fewer than two full partitions nothing is judged: sinks plus the most
recent tokens are kept, as in kvpress. A zero min-max range is clamped (kvpress would divide by 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer

#: score of the reference-less tail: above any partition score (≤ 1), below the sinks (+inf)
TAIL_SCORE = 2.0


def lag_relative_score(states: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """states: (..., P + 1, L, D) whole partitions -> (..., P, L): softmax over each partition
    of std over channels of its states min-max normalised by the next partition."""
    ref = states[..., 1:, :, :]  # (..., P, L, D), the reference of each judged partition
    judged = states[..., :-1, :, :]  # (..., P, L, D)
    low = ref.amin(dim=-2, keepdim=True)  # (..., P, 1, D)
    high = ref.amax(dim=-2, keepdim=True)  # (..., P, 1, D)
    normalised = (judged - low) / (high - low).clamp_min(eps)  # (..., P, L, D)
    return channel_std(normalised).softmax(dim=-1)  # (..., P, L)


def channel_std(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (...): std over the last axis with Bessel's correction, in two float64 passes.

    ``torch.std`` on CPU accumulates floats in float64 too, with a Welford kernel that is several
    times slower on rows of a few dozen channels; both round to the same float32 values (the
    rare exception differs in the last bit).
    """
    x64 = x.double()
    centred = x64 - x64.mean(dim=-1, keepdim=True)  # (..., D)
    return centred.square_().sum(dim=-1).div_(x.shape[-1] - 1).sqrt_().to(x.dtype)


def ranks_in_partitions(scores: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L) float: each score's rank in its partition (0 = lowest), the inverse
    of its ``argsort`` (one sort and a scatter instead of sorting twice)."""
    order = scores.argsort(dim=-1)  # (..., L)
    steps = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)  # (..., L)
    return torch.empty_like(order).scatter_(-1, order, steps).float()


@dataclass
class LagKV(Scorer):
    """Per-partition std of K and V normalised by the next partition's range; sinks and tail kept."""

    name = "lagkv"
    summary = "Score each 128-token partition against the next one's K/V range (no queries)."
    paper = "arXiv 2504.04704"
    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self) -> None:
        if self.lag_size < 2 or self.n_sink < 0:
            raise KVTrimError(f"lagkv needs lag_size ≥ 2 and n_sink ≥ 0, got {self.lag_size}, {self.n_sink}.")

    def score(self, view: LayerView) -> torch.Tensor:
        bsz, n_kv, seq, dim = view.keys.shape
        scores = torch.full((bsz, n_kv, seq), TAIL_SCORE, device=view.keys.device)  # (B, Hkv, T)
        n_parts = max(seq - self.n_sink, 0) // self.lag_size  # whole partitions after the sinks
        if n_parts >= 2:
            end = self.n_sink + n_parts * self.lag_size
            shape = (bsz, n_kv, n_parts, self.lag_size, -1)
            keys = view.keys[:, :, self.n_sink : end].float().reshape(shape)  # (B, Hkv, P + 1, L, D)
            values = view.values[:, :, self.n_sink : end].float().reshape(shape)  # (B, Hkv, P + 1, L, D)
            relative = lag_relative_score(keys), lag_relative_score(values)  # (B, Hkv, P, L) each
            judged = (relative[0] + relative[1]) / 2  # (B, Hkv, P, L)
            if not self.cross_scoring:
                judged = ranks_in_partitions(judged) / self.lag_size  # rank in partition
            scores[..., self.n_sink : end - self.lag_size] = judged.reshape(bsz, n_kv, -1)  # (B, Hkv, P·L)
        scores[..., : self.n_sink] = torch.inf
        return scores
