"""SnapKV (arXiv 2404.14469): the last context queries already know what the question will need.

Each head attends to a stable set of context positions, and the attention of the last ``window``
context queries (the "observation window", which usually holds the instruction) predicts it.
Scores: that window's attention to every earlier key, averaged over the window queries, smoothed
by 1-D average pooling over positions (so the neighbours of a hit survive with it, keeping local
context intact), averaged over the GQA group so that the G query heads sharing a kv-head vote
together (as NVIDIA kvpress does; the original repeats kv-heads instead). The window itself is
always kept.

Follows the reference implementation: softmax in float32 over all keys the query can see
(window included), window columns dropped before pooling, zero padding counted in the pooling
average (``avg_pool1d`` defaults). The layer's own ``scaling`` replaces 1/√D, which differs only
for models such as Gemma 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.attention import attention_probs
from kvtrim.scorers.base import LayerView, Scorer


def snapkv_scores(view: LayerView, window: int, kernel_size: int) -> torch.Tensor:
    """SnapKV scores (B, Hkv, T); the keys of the observation window score +inf."""
    bsz, n_kv, seq, _ = view.keys.shape
    n_window = min(window, len(view.query_positions))
    queries = view.queries(rotated=True, last=n_window)  # (B, H, W, D)
    window_pos = view.query_positions[-n_window:]  # (W,)
    probs = attention_probs(view, queries, window_pos)  # (B, Hkv, G, W, T)
    # key positions ascend, so the keys before the window are a prefix
    n_before = int(torch.searchsorted(view.key_positions.to(probs.device), window_pos[0].to(probs.device)))
    votes = probs.mean(dim=3)[..., :n_before]  # (B, Hkv, G, T − W)
    scores = torch.full((bsz, n_kv, seq), torch.inf, device=probs.device)  # (B, Hkv, T)
    if n_before:
        flat = votes.reshape(bsz, n_kv * view.group_size, -1)  # (B, H, T − W)
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)  # (B, H, T − W)
        scores[..., :n_before] = pooled.view(bsz, n_kv, view.group_size, -1).mean(dim=2)  # (B, Hkv, T − W)
    return scores


@dataclass
class SnapKV(Scorer):
    """Attention of the last ``window`` queries, pooled over ``kernel_size`` positions; window kept."""

    name = "snapkv"
    summary = "Attention from the last 64 context queries, pooled over positions; the window is kept."
    paper = "arXiv 2404.14469"
    window: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        check_snapkv_options(self.window, self.kernel_size)

    def score(self, view: LayerView) -> torch.Tensor:
        return snapkv_scores(view, self.window, self.kernel_size)


@dataclass
class SnapKVQueryAware(SnapKV):
    """SnapKV as in the paper: the question is prefilled after the context and compressed with it,
    so the observation window — the prompt's last ``window`` tokens — is the question (preceded by
    the end of the context when the question is shorter than the window). Its cache serves that one
    question only; plain ``snapkv`` compresses the context alone and serves any question."""

    name = "snapkv-query-aware"
    summary = "SnapKV with the question compressed after the context: the window is the question."
    query_aware = True


def check_snapkv_options(window: int, kernel_size: int) -> None:
    """An even kernel would shift the pooled scores by half a position: refuse it."""
    if window < 1:
        raise KVTrimError(f"window must be a positive number of queries, got {window}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise KVTrimError(f"kernel_size must be a positive odd number (centred pooling), got {kernel_size}.")
