"""KeyDiff (arXiv 2504.15364): keep the keys that differ most from the average key.

Keys pointing away from the common direction of a head's keys tend to draw distinctive attention,
while keys aligned with it are redundant. Score = −cos(k, anchor), the anchor being the mean of
the head's L2-normalised keys (as in the paper and kvpress). Needs no queries and no attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class KeyDiff(Scorer):
    """Score = −cosine similarity between a key and its head's mean normalised key."""

    name = "keydiff"
    summary = "Keep keys least similar to the head's mean normalised key (no queries needed)."
    paper = "arXiv 2504.15364"

    def score(self, view: LayerView) -> torch.Tensor:
        keys = view.keys.float()  # (B, Hkv, T, D)
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)  # (B, Hkv, 1, D)
        return -F.cosine_similarity(keys, anchor, dim=-1)  # (B, Hkv, T)
