"""Learned surrogates of a costly scorer, fitted locally: KVzap (arXiv 2601.07891).

KVzip scores a context by making the model repeat it (several extra forwards). KVzap learns to
predict those scores from each layer's input hidden states with one linear map per layer
(hidden → one score per KV head), so scoring costs one small matmul in the prefill. Here the map
is fitted in closed form (ridge regression on log-scores, float64), which is deterministic:
the same text, model and seed give the same weights, and a planted linear score is recovered
exactly. The teacher's scores come from a higher layer (:mod:`kvtrim.strategies.surrogates`
runs KVzip), registered with :func:`register_teacher`, so this module stays below the scorers.

The fit is measured on held-out sequences (the last ``held_out`` of the calibration windows):
Spearman rank correlation between predicted and KVzip scores, per layer, averaged over heads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrim.calibration.corpus import calibration_windows, surrogate_texts
from kvtrim.calibration.store import artefact_path, load_or_compute
from kvtrim.core.errors import KVTrimError
from kvtrim.models.adapters import max_context, text_config

KVZAP_VERSION = 2  # 2: fitted on prose and generated records, windows taken from each text in turn
#: log-scores are taken of max(score, LOG_FLOOR): KVzip's scores are attention weights in [0, 1]
LOG_FLOOR = 1e-8

#: (model, tokenizer, text, seed) -> (per layer: hidden states (T, F), teacher scores (Hkv, T)),
#: for the layers the teacher scores (full-attention ones)
Teacher = Callable[[nn.Module, Any, str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]]
_TEACHERS: dict[str, Teacher] = {}


def register_teacher(name: str, teacher: Teacher) -> None:
    _TEACHERS[name] = teacher


def kvzap_path(model: nn.Module) -> Path:
    return artefact_path(model, "kvzap.safetensors")


# --- the fit ------------------------------------------------------------------------------------


def fit_linear(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Ridge regression with a bias: features (N, F), targets (N, O) -> weights (F + 1, O), the
    last row the bias, minimising ‖[X 1]W − Y‖² + λ‖W_{:F}‖² with λ = ``ridge`` × mean diag(XᵀX)."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)  # (N, F+1)
    gram = x.T @ x  # (F+1, F+1)
    penalty = ridge * float(gram.diagonal()[:-1].mean()) if features.shape[1] else 0.0
    gram.diagonal()[:-1] += penalty  # the bias is not shrunk
    return torch.linalg.solve(gram, x.T @ targets.double())  # (F+1, O)


def predict_linear(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """weights (F + 1, O), features (..., F) -> (..., O)."""
    return features.to(weights.dtype) @ weights[:-1] + weights[-1]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by order, which continuous scores make rare)."""
    ranks = [torch.argsort(torch.argsort(x)).double() for x in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def log_scores(scores: torch.Tensor) -> torch.Tensor:
    return scores.double().clamp_min(LOG_FLOOR).log()


@torch.inference_mode()
def fit_kvzap(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int = 8,
    seq_len: int = 1024,
    held_out: int = 2,
    ridge: float = 1e-3,
    seed: int = 0,
    teacher: str = "kvzip",
) -> dict[str, torch.Tensor]:
    """Fit KVzap's per-layer linear maps on ``texts`` against ``teacher``'s scores.

    Returns ``weights`` (L, F + 1, Hkv) float32, ``trained`` (L,) bool (layers the teacher scores)
    and ``spearman`` (L,) the held-out rank correlation (NaN where untrained or nothing held out).
    """
    samples, n_held = teacher_samples(model, tokenizer, texts, n_sequences, seq_len, held_out, seed, teacher)
    n_layers = int(text_config(model).num_hidden_layers)
    train, test = samples[: len(samples) - n_held], samples[len(samples) - n_held :]
    first = next(iter(samples[0].values()))
    n_features, n_kv = first[0].shape[-1], first[1].shape[0]
    weights = torch.zeros(n_layers, n_features + 1, n_kv)
    trained = torch.zeros(n_layers, dtype=torch.bool)
    correlation = torch.full((n_layers,), float("nan"))
    for layer in sorted(samples[0]):
        x, y = teacher_rows(train, layer)  # (N, F), (N, Hkv)
        fitted = fit_linear(x, y, ridge)  # (F + 1, Hkv)
        weights[layer], trained[layer] = fitted.float(), True
        if test:
            x_test, want = teacher_rows(test, layer)
            got = predict_linear(fitted, x_test)  # (M, Hkv)
            correlation[layer] = held_out_spearman(got, want)
    return {"weights": weights, "trained": trained, "spearman": correlation}


#: one calibration window: per layer the teacher scores, (hidden states (T, F), scores (Hkv, T))
Sample = dict[int, tuple[torch.Tensor, torch.Tensor]]


def teacher_samples(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int,
    seq_len: int,
    held_out: int,
    seed: int,
    teacher: str = "kvzip",
) -> tuple[list[Sample], int]:
    """The teacher's hidden states and scores over ``n_sequences`` windows of ``texts``, and how
    many of the last ones to hold out (at least one is trained on): the data every surrogate fits."""
    if teacher not in _TEACHERS:
        raise KVTrimError(f"No teacher {teacher!r} to fit on (import kvtrim to register KVzip).")
    seq_len = min(seq_len, max_context(model) // 2)  # KVzip needs room to repeat the context after it
    windows = calibration_windows(tokenizer, texts, n_sequences, seq_len)
    n_held = min(held_out, len(windows) - 1)
    progress = tqdm(windows, desc="scoring calibration text with KVzip", unit="seq", file=sys.stderr)
    return [_TEACHERS[teacher](model, tokenizer, text, seed + i) for i, text in enumerate(progress)], n_held


def held_out_spearman(predicted: torch.Tensor, wanted: torch.Tensor) -> float:
    """predicted, wanted (M, Hkv): rank correlation per head, averaged."""
    return sum(spearman(predicted[:, h], wanted[:, h]) for h in range(wanted.shape[1])) / wanted.shape[1]


def teacher_rows(samples: list[Sample], layer: int, log: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (hidden states (N, F), log-scores (N, Hkv), or the scores themselves) over
    ``samples``, without the pairs the teacher keeps unconditionally (its sinks score +inf:
    there is nothing to learn there)."""
    xs, ys = [], []
    for sample in samples:
        hidden, scores = sample[layer]  # (T, F), (Hkv, T)
        finite = torch.isfinite(scores).all(dim=0)  # (T,)
        xs.append(hidden[finite].double())
        kept = scores[:, finite]  # (Hkv, T')
        ys.append((log_scores(kept) if log else kept.double()).T)
    return torch.cat(xs), torch.cat(ys)


def load_or_fit_kvzap(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """KVzap's weights from the disk cache; fitted on the surrogate texts and saved if absent."""
    return load_or_compute(
        kvzap_path(model),
        KVZAP_VERSION,
        "KVzap's score predictor",
        "kvtrim calibrate --what kvzap",
        lambda: fit_kvzap(model, tokenizer, texts or surrogate_texts(), **kwargs),
        tokenizer,
        cached=not refresh and texts is None,
    )
