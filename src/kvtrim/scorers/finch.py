"""FINCH (Corallo & Papotti, TACL 2024): the question's own attention picks the context to keep.

FINCH prefills the question after the context and keeps, for that question, the pairs its tokens
attend to most: SnapKV's score with the observation window being exactly the question (found by
a delimiter token in the reference implementation; here from the tokenization, which knows where
the question starts). The context is judged in chunks of ``chunk_size`` tokens, as FINCH reads a
long document piece by piece: every chunk keeps the same share of its pairs (each token scores its
rank quantile inside its chunk), so no part of the document
is wiped out by a denser one. ``chunk_size=0`` ranks the whole context at once. The question's
pairs are kept. FINCH's key re-rotation is kvtrim's ``/rerotate`` axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.scorers.chunkkv import chunk_lengths, ranks_in_chunks
from kvtrim.scorers.snapkv import snapkv_scores


def chunk_quantiles(scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """scores (B, Hkv, T), finite -> (B, Hkv, T): 1 − rank / n inside each chunk of ``chunk_size``
    (n its length, rank 0 its best), so that a global top-k keeps the same share of every chunk."""
    seq = scores.shape[-1]
    lengths = chunk_lengths(seq, chunk_size, scores.device).repeat_interleave(chunk_size)[:seq]  # (T,)
    return 1.0 - ranks_in_chunks(scores, chunk_size) / lengths


@dataclass
class FINCH(Scorer):
    """The question's attention to the context, each chunk of ``chunk_size`` keeping its share."""

    name = "finch"
    summary = "Attention from the question's own tokens (prefilled after the context), chunk by chunk."
    paper = "TACL 2024 (FINCH)"
    query_aware = True
    chunk_size: int = 512
    kernel_size: int = 1

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise KVTrimError(f"chunk_size must be >= 0 tokens (0: no chunks), got {self.chunk_size}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KVTrimError(f"kernel_size must be a positive odd number, got {self.kernel_size}.")

    def score(self, view: LayerView) -> torch.Tensor:
        if view.question_length < 1:
            raise KVTrimError("FINCH observes with the question's tokens: compress with question=...")
        scores = snapkv_scores(view, view.question_length, self.kernel_size)  # (B, Hkv, T), question +inf
        if not self.chunk_size:
            return scores
        context = torch.isfinite(scores[0, 0])  # (T,) the same positions in every head
        out = scores.clone()
        out[..., context] = chunk_quantiles(scores[..., context], self.chunk_size)
        return out
