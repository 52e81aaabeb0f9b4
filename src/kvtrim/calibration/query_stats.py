"""Query statistics (for ``expected-attention-calibrated``), computed locally: the mean and
covariance of every (layer, query head)'s pre-RoPE queries over local text, (L, H, D) and
(L, H, D, D). They describe "a typical future query" independently of the context being
compressed, which matters when the context's own queries are few or unlike the questions to come.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrim.calibration.corpus import calibration_sequences
from kvtrim.core.errors import KVTrimError
from kvtrim.core.hooks import attention_hooks
from kvtrim.models.adapters import attention_modules, hooked_layers, queries_from_projection
from kvtrim.models.forward import forward


@torch.inference_mode()
def compute_query_stats(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int = 20,
    seq_len: int = 2048,
    skip_first: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (L, H, D) and population covariance (L, H, D, D) of the pre-RoPE queries (q-norm
    applied) of every layer and query head over ``texts``, float32 on CPU.

    The first ``skip_first`` positions of each sequence are left out, as expected-attention leaves
    out the queries of its sink positions: they are outliers no later query resembles. Sums are
    accumulated in float64 so that E[qqᵀ] − μμᵀ does not cancel badly.
    """
    sequences = calibration_sequences(model, tokenizer, texts, n_sequences, seq_len)
    if all(len(seq) <= skip_first for seq in sequences):
        raise KVTrimError("Calibration sequences are too short for query statistics.")
    attentions = attention_modules(model)
    sums: list[torch.Tensor | None] = [None] * len(attentions)  # (H, D) each
    squares: list[torch.Tensor | None] = [None] * len(attentions)  # (H, D, D) each

    def collect(idx: int, projected: torch.Tensor) -> None:
        q = queries_from_projection(attentions[idx], projected)[0, :, skip_first:].double().cpu()  # (H, N, D)
        total, outer = q.sum(dim=1), q.transpose(-1, -2) @ q  # (H, D), (H, D, D)
        sums[idx] = total if sums[idx] is None else sums[idx] + total
        squares[idx] = outer if squares[idx] is None else squares[idx] + outer

    count = 0
    with attention_hooks(hooked_layers(model), on_projection=collect):
        for seq in tqdm(sequences, desc="calibrating query statistics", unit="seq", file=sys.stderr):
            forward(model, [seq])
            count += max(0, len(seq) - skip_first)
    means, covs = [], []
    for total, outer in zip(sums, squares, strict=True):
        mean = total / count  # (H, D)
        means.append(mean)
        covs.append(outer / count - mean[:, :, None] * mean[:, None, :])  # E[qqᵀ] − μμᵀ, (H, D, D)
    return torch.stack(means).float(), torch.stack(covs).float()
