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
    """states: (B, Hkv, P + 1, L, D) whole partitions -> (B, Hkv, P, L): softmax over each partition
    of std over channels of its states min-max normalised by the next partition."""
    ref = states[:, :, 1:]  # (B, Hkv, P, L, D), the reference of each judged partition
    judged = states[:, :, :-1]  # (B, Hkv, P, L, D)
    low = ref.amin(dim=-2, keepdim=True)  # (B, Hkv, P, 1, D)
    high = ref.amax(dim=-2, keepdim=True)  # (B, Hkv, P, 1, D)
    normalised = (judged - low) / (high - low).clamp_min(eps)  # (B, Hkv, P, L, D)
    return normalised.std(dim=-1).softmax(dim=-1)  # (B, Hkv, P, L)


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
            shape = (bsz, n_kv, n_parts, self.lag_size, dim)
            keys = view.keys[:, :, self.n_sink : end].float().reshape(shape)  # (B, Hkv, P + 1, L, D)
            values = view.values[:, :, self.n_sink : end].float().reshape(shape)  # (B, Hkv, P + 1, L, D)
            judged = (lag_relative_score(keys) + lag_relative_score(values)) / 2  # (B, Hkv, P, L)
            if not self.cross_scoring:
                judged = judged.argsort(dim=-1).argsort(dim=-1).float() / self.lag_size  # rank in partition
            scores[..., self.n_sink : end - self.lag_size] = judged.reshape(bsz, n_kv, -1)  # (B, Hkv, P·L)
        scores[..., : self.n_sink] = torch.inf
        return scores
