"""Scorers that need nothing but the cache: KNorm and the sanity baselines."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class NoEviction(Scorer):
    """Keeps every pair: the reference every other method is measured against."""

    name = "none"
    summary = "No eviction: the full cache (reference)."
    paper = "-"
    evicts = False
    chunkable = True

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.zeros(view.keys.shape[:3], device=view.keys.device)


@dataclass
class KNorm(Scorer):
    """Keys with a low L2 norm draw high attention, so keep the smallest norms.

    RoPE is a rotation, so the norm of the cached (post-RoPE) key equals the pre-RoPE one.
    """

    name = "knorm"
    summary = "Keep keys with the smallest L2 norm (no queries, no attention weights)."
    paper = "arXiv 2406.11430"
    chunkable = True

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)  # (B, Hkv, T)


@dataclass
class RandomScorer(Scorer):
    """Uniform random scores, seeded per layer: the floor any method must beat."""

    name = "random"
    summary = "Random scores (seeded): the floor a method must beat."
    paper = "-"
    chunkable = True

    def score(self, view: LayerView) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(view.seed * 100_003 + view.layer_idx)
        return torch.rand(view.keys.shape[:3], generator=gen).to(view.keys.device)


@dataclass
class StreamingLLM(Scorer):
    """Attention sinks plus a recent window: keep the first ``n_sink`` tokens and the latest ones."""

    name = "streaming-llm"
    summary = "Keep the first n_sink tokens (attention sinks) and the most recent ones."
    paper = "arXiv 2309.17453"
    chunkable = True
    n_sink: int = 4

    def score(self, view: LayerView) -> torch.Tensor:
        pos = view.key_positions.float().to(view.keys.device)  # (T,) or (B, Hkv, T)
        scores = torch.where(pos < self.n_sink, torch.inf, pos)
        return scores.expand(*view.keys.shape[:2], -1).clone()  # (B, Hkv, T)
