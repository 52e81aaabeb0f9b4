"""Fast KVzip's gates (arXiv 2601.17668), trained locally on kvtrim's own KVzip scores.

Like KVzap (:mod:`kvtrim.calibration.surrogates`), a gate per layer reads the attention's input
hidden states and predicts, for every KV head, how much KVzip would value the pair. The gate is a
*low-rank sink attention*: the hidden state is projected to a small query q (rank ``rank``) per
KV head, which attends to its own learned logit a = w·q + b and to ``n_sinks`` learned sink keys
s_j; the gate is the share the token keeps, g = e^a / (e^a + Σ_j e^{s_j·q}) ∈ (0, 1). A token that
looks like what the sinks absorb gets little; one KVzip would have read gets close to 1.

Training distils KVzip's scores in log space (mean squared error between log g and log score,
Adam on mini-batches drawn from a seeded generator: the same text, model and seed give the same
gates). Features are standardised with the training rows' mean and spread, stored with the gates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrim.calibration.corpus import surrogate_texts
from kvtrim.calibration.store import artefact_path, load_or_compute
from kvtrim.calibration.surrogates import (
    LOG_FLOOR,
    held_out_spearman,
    teacher_rows,
    teacher_samples,
)
from kvtrim.models.adapters import text_config

FASTKVZIP_VERSION = 2  # 2: fitted on prose and generated records, windows taken from each text in turn
#: the tensors of one model's gates, each with a leading layer axis (L, ...)
GATE_PARTS = ("down", "self_weight", "bias", "sinks", "feature_mean", "feature_scale")


def fastkvzip_path(model: nn.Module) -> Path:
    return artefact_path(model, "fastkvzip.safetensors")


def gate_log(gate: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """log g of one layer's gate: features (..., F) -> (..., Hkv). ``gate`` holds that layer's
    down (F, Hkv, r), self_weight (Hkv, r), bias (Hkv,), sinks (Hkv, m, r), feature_mean /
    feature_scale (F,)."""
    x = (features - gate["feature_mean"]) / gate["feature_scale"]  # (..., F)
    q = torch.einsum("...f,fhr->...hr", x, gate["down"])  # (..., Hkv, r)
    own = (q * gate["self_weight"]).sum(-1) + gate["bias"]  # (..., Hkv)
    sinks = torch.einsum("...hr,hmr->...hm", q, gate["sinks"])  # (..., Hkv, m)
    return own - torch.logsumexp(torch.cat([own[..., None], sinks], dim=-1), dim=-1)  # log share


def layer_gate(gates: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    return {name: gates[name][layer] for name in GATE_PARTS}


def train_gate(
    features: torch.Tensor,
    scores: torch.Tensor,
    rank: int = 16,
    n_sinks: int = 4,
    steps: int = 500,
    batch: int = 2048,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fit one layer's gate: features (N, F), scores (N, Hkv) in (0, 1] -> its tensors (float32).
    Trains with autograd even when called under inference mode (a first use inside ``compress``)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train_gate(features, scores, rank, n_sinks, steps, batch, lr, seed)


def _train_gate(
    features: torch.Tensor,
    scores: torch.Tensor,
    rank: int,
    n_sinks: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = features.float().clone()  # a plain tensor (the teacher's came from inference mode)
    target = scores.double().clamp_min(LOG_FLOOR).log().float()  # (N, Hkv)
    n_features, n_kv = x.shape[1], target.shape[1]
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)  # (F,)
    params = {
        "down": torch.randn(n_features, n_kv, rank, generator=gen) / n_features**0.5,
        "self_weight": torch.randn(n_kv, rank, generator=gen) * 0.1,
        "bias": target.mean(0).clone(),  # start at the mean log-score
        "sinks": torch.randn(n_kv, n_sinks, rank, generator=gen) * 0.1,
    }
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    fixed = {"feature_mean": mean, "feature_scale": scale}
    for _ in range(steps):
        rows = torch.randint(len(x), (min(batch, len(x)),), generator=gen)  # (b,)
        loss = (gate_log({**params, **fixed}, x[rows]) - target[rows]).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {**{name: t.detach().clone() for name, t in params.items()}, **fixed}


def fit_fastkvzip(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int = 8,
    seq_len: int = 1024,
    held_out: int = 2,
    seed: int = 0,
    teacher: str = "kvzip",
    **training: Any,
) -> dict[str, torch.Tensor]:
    """Train Fast KVzip's gates of every layer the teacher scores on ``texts``.

    Returns the :data:`GATE_PARTS` stacked over layers (zeros where untrained), ``trained`` (L,)
    and ``spearman`` (L,) the held-out rank correlation with the teacher (NaN where not measured).
    """
    samples, n_held = teacher_samples(model, tokenizer, texts, n_sequences, seq_len, held_out, seed, teacher)
    train, test = samples[: len(samples) - n_held], samples[len(samples) - n_held :]
    n_layers = int(text_config(model).num_hidden_layers)
    fitted: dict[int, dict[str, torch.Tensor]] = {}
    correlation = torch.full((n_layers,), float("nan"))
    for layer in tqdm(sorted(samples[0]), desc="training Fast KVzip gates", unit="layer", file=sys.stderr):
        x, y = teacher_rows(train, layer, log=False)  # (N, F), (N, Hkv)
        fitted[layer] = train_gate(x, y, seed=seed + layer, **training)
        if test:
            x_test, want = teacher_rows(test, layer, log=False)
            correlation[layer] = held_out_spearman(gate_log(fitted[layer], x_test.float()), want)
    example = next(iter(fitted.values()))
    out = {name: torch.zeros(n_layers, *example[name].shape) for name in GATE_PARTS}
    out["feature_scale"] += 1.0  # untrained layers stay well defined
    for layer, gate in fitted.items():
        for name in GATE_PARTS:
            out[name][layer] = gate[name]
    trained = torch.zeros(n_layers, dtype=torch.bool)
    trained[list(fitted)] = True
    return {**out, "trained": trained, "spearman": correlation}


def load_or_fit_fastkvzip(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Fast KVzip's gates from the disk cache; trained on the surrogate texts and saved if absent."""
    return load_or_compute(
        fastkvzip_path(model),
        FASTKVZIP_VERSION,
        "Fast KVzip's gates",
        "kvtrim calibrate --what fastkvzip",
        lambda: fit_fastkvzip(model, tokenizer, texts or surrogate_texts(), **kwargs),
        tokenizer,
        cached=not refresh and texts is None,
    )
