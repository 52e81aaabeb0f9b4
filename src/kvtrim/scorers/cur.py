"""CUR-style approximate leverage scores, after CurDKV (arXiv 2509.15038) as NVIDIA kvpress's ``CURPress``.

CUR decomposition keeps the rows of a matrix with the largest leverage scores; for the attention
output softmax(QKᵀ)V the relevant rows are those of both K and V. CurDKV approximates leverage by
squared row norms: k² = ‖k‖², v² = ‖v‖². With the local approximation (default) each is divided
by its sum over a non-overlapping block of ``local_window`` positions — a token competes with its
neighbours only, so a long span of large-norm tokens does not take the whole budget. The score is
k²·v² (``leverage="kv_product"``; also "key", "value", "kv_avg"), normalised to sum to 1 per head,
and the first ``n_sink`` tokens are kept (+inf; kvpress sets them to 1, which is above every other
normalised score). kvpress's optional random Gaussian projection is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer

LEVERAGE_TYPES = ("kv_product", "kv_avg", "key", "value")


def local_share(x: torch.Tensor, window: int) -> torch.Tensor:
    """x: (B, Hkv, T) -> each entry divided by the sum of its block of ``window`` positions."""
    seq = x.shape[-1]
    padded = F.pad(x, (0, -seq % window))  # (B, Hkv, ⌈T/w⌉·w), zeros do not change block sums
    blocks = padded.reshape(*x.shape[:2], -1, window)  # (B, Hkv, ⌈T/w⌉, w)
    share = blocks / blocks.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, Hkv, ⌈T/w⌉, w)
    return share.reshape(*x.shape[:2], -1)[..., :seq]  # (B, Hkv, T)


@dataclass
class CUR(Scorer):
    """Approximate CUR leverage: ‖k‖²·‖v‖², each as a share of its local block; sinks kept."""

    name = "cur"
    summary = "CurDKV: ‖k‖²·‖v‖² leverage, normalised over local blocks of 16 (no queries)."
    paper = "arXiv 2509.15038"
    n_sink: int = 4
    leverage: str = "kv_product"
    local_approximation: bool = True
    local_window: int = 16

    def __post_init__(self) -> None:
        if self.leverage not in LEVERAGE_TYPES:
            raise KVTrimError(f"leverage must be one of {', '.join(LEVERAGE_TYPES)}, got {self.leverage!r}.")
        if self.local_window < 1:
            raise KVTrimError(f"local_window must be a positive number of tokens, got {self.local_window}.")

    def score(self, view: LayerView) -> torch.Tensor:
        k2 = view.keys.float().square().sum(dim=-1)  # (B, Hkv, T)
        v2 = view.values.float().square().sum(dim=-1)  # (B, Hkv, T)
        if self.local_approximation:
            k2, v2 = local_share(k2, self.local_window), local_share(v2, self.local_window)
        scores = {"kv_product": k2 * v2, "kv_avg": (k2 + v2) / 2, "key": k2, "value": v2}[self.leverage]
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, Hkv, T)
        scores[..., : self.n_sink] = torch.inf
        return scores
