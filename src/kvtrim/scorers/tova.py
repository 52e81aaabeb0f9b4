"""TOVA, Token Omission Via Attention (arXiv 2401.06104): the last token decides what to drop.

Scores are the attention the last context token pays each key. As in the paper (and kvpress),
that attention is averaged over all heads of the layer, so every head of a layer keeps the same
tokens; ``per_kv_head=True`` averages only over each kv-head's GQA group instead. The last token
itself is always kept (kvpress does the same; TOVA leaves it to its attention weight, which is
almost always high).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.scorers.attention import attention_probs
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class TOVA(Scorer):
    """Attention of the last token, averaged over the layer's heads; the last token is kept."""

    name = "tova"
    summary = "Attention the last token pays each key, averaged over the layer's heads."
    paper = "arXiv 2401.06104"
    per_kv_head: bool = False

    def score(self, view: LayerView) -> torch.Tensor:
        bsz, n_kv, seq, _ = view.keys.shape
        last = view.queries(rotated=True, last=1)  # (B, H, 1, D)
        probs = attention_probs(view, last, view.query_positions[-1:])[:, :, :, 0]  # (B, Hkv, G, T)
        if self.per_kv_head:
            scores = probs.mean(dim=2)  # (B, Hkv, T)
        else:
            scores = probs.mean(dim=(1, 2))[:, None].expand(bsz, n_kv, seq).clone()  # (B, Hkv, T)
        is_last = view.key_positions.to(scores.device) >= view.query_positions[-1].to(scores.device)  # (T,)
        return scores.masked_fill(is_last, torch.inf)
