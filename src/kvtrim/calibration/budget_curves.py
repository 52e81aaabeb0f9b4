"""LU-KV's budget curves (arXiv 2602.08585), computed locally: how many pairs each layer and head
should keep, for every overall ratio, so that the pairs kept are worth the most.

LU-KV spends a global budget where the future utility of the pairs is highest, instead of the
same share everywhere, and ships the result as curves of shape [99 ratios, layers, kv-heads]
per model. Here the utility is kvtrim's own KVzip score (how much the context's reconstruction
reads each pair) on local text, and the optimisation is exact: keeping the globally top-scored
(1 − r) of all pairs maximises the total utility kept, so the curve at ratio r is each head's
share of that global top set, averaged over the calibration windows. Pairs the teacher keeps
unconditionally (its sinks, +inf) count as kept; layers it does not score (sliding-window ones,
which are never compressed) keep everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtrim.calibration.corpus import surrogate_texts
from kvtrim.calibration.store import artefact_path, load_or_compute
from kvtrim.calibration.surrogates import Sample, teacher_samples
from kvtrim.models.adapters import text_config

LUKV_VERSION = 2  # 2: fitted on prose and generated records, windows taken from each text in turn
#: the ratios a curve is given at: 0.01, 0.02, ..., 0.99
RATIO_GRID = torch.arange(1, 100, dtype=torch.float64) / 100


def lukv_path(model: nn.Module) -> Path:
    return artefact_path(model, "lukv-curves.safetensors")


def keep_shares(sample: Sample, n_layers: int, ratios: torch.Tensor = RATIO_GRID) -> torch.Tensor:
    """One window's curves: (R, L, Hkv) share of each head's pairs in the global top (1 − r) of
    the scored layers' pairs, for every ratio r (unscored layers: 1)."""
    layers = sorted(sample)
    scores = torch.stack([sample[idx][1].double() for idx in layers])  # (L', Hkv, T)
    n_kv, seq = scores.shape[1:]
    ordered = scores.flatten().sort(descending=True).values  # (L'·Hkv·T,)
    keep = (1.0 - ratios).mul(len(ordered)).round().long().clamp(1, len(ordered))  # (R,)
    thresholds = ordered[keep - 1]  # (R,) the smallest score kept
    out = torch.ones(len(ratios), n_layers, n_kv, dtype=torch.float64)
    kept = (scores[None] >= thresholds[:, None, None, None]).double().mean(-1)  # (R, L', Hkv)
    out[:, layers] = kept
    return out


def compute_lukv_curves(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int = 8,
    seq_len: int = 1024,
    seed: int = 0,
    teacher: str = "kvzip",
) -> dict[str, torch.Tensor]:
    """``curves`` (99, L, Hkv) float32: the share each head keeps at ratio 0.01 … 0.99, averaged
    over ``n_sequences`` windows of ``texts`` scored by ``teacher``."""
    samples, _ = teacher_samples(model, tokenizer, texts, n_sequences, seq_len, 0, seed, teacher)
    n_layers = int(text_config(model).num_hidden_layers)
    curves = torch.stack([keep_shares(sample, n_layers) for sample in samples]).mean(0)  # (R, L, Hkv)
    return {"curves": curves.float(), "ratios": RATIO_GRID.float()}


def load_or_compute_lukv(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """LU-KV's curves from the disk cache; computed on the surrogate texts and saved if absent."""
    return load_or_compute(
        lukv_path(model),
        LUKV_VERSION,
        "LU-KV's budget curves",
        "kvtrim calibrate --what lukv",
        lambda: compute_lukv_curves(model, tokenizer, texts or surrogate_texts(), **kwargs),
        tokenizer,
        cached=not refresh and texts is None,
    )
