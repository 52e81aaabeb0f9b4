"""The cached calibration artefacts, one loader each: computed once per model from local text
(the bundled prose by default), stored and verified by :mod:`kvtrim.calibration.store`.

Each ``*_VERSION`` names the computation: raising it makes every stored copy stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtrim.calibration.corpus import bundled_texts
from kvtrim.calibration.duo_heads import compute_duo_heads
from kvtrim.calibration.qfilters import compute_qfilters
from kvtrim.calibration.query_stats import compute_query_stats
from kvtrim.calibration.store import artefact_path, load_or_compute

QFILTERS_VERSION = 1
QUERY_STATS_VERSION = 1
DUO_VERSION = 1


def qfilters_path(model: nn.Module) -> Path:
    return artefact_path(model, "qfilters.safetensors")


def query_stats_path(model: nn.Module) -> Path:
    return artefact_path(model, "query_stats.safetensors")


def duo_heads_path(model: nn.Module) -> Path:
    return artefact_path(model, "duo_heads.safetensors")


def load_or_compute_qfilters(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> torch.Tensor:
    """Filters (L, Hkv, D) from the disk cache, computing and saving them first if absent."""
    stored = load_or_compute(
        qfilters_path(model),
        QFILTERS_VERSION,
        "Q-Filters",
        "kvtrim calibrate",
        lambda: {"filters": compute_qfilters(model, tokenizer, texts or bundled_texts(), **kwargs)},
        tokenizer,
        cached=not refresh and texts is None,
    )
    return stored["filters"]


def load_or_compute_query_stats(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (L, H, D), covariance (L, H, D, D)) from the disk cache, computed and saved first if
    absent or written by another version of the computation."""

    def compute() -> dict[str, torch.Tensor]:
        mean, cov = compute_query_stats(model, tokenizer, texts or bundled_texts(), **kwargs)
        return {"mean": mean, "cov": cov}

    stored = load_or_compute(
        query_stats_path(model),
        QUERY_STATS_VERSION,
        "Query statistics",
        "kvtrim calibrate --what query-stats",
        compute,
        tokenizer,
        cached=not refresh and texts is None,
    )
    return stored["mean"], stored["cov"]


def load_or_compute_duo_heads(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> torch.Tensor:
    """Retrieval scores (L, Hkv) from the disk cache, computed and saved first if absent or stale."""
    stored = load_or_compute(
        duo_heads_path(model),
        DUO_VERSION,
        "Duo head splits",
        "kvtrim calibrate --what duo-heads",
        lambda: {"retrieval": compute_duo_heads(model, tokenizer, texts or bundled_texts(), **kwargs)},
        tokenizer,
        cached=not refresh and texts is None,
    )
    return stored["retrieval"]
