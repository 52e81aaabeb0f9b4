"""Fast KVzip: a gate trained on planted scores recovers them, training is deterministic, and the
scorer is the trained gate, end to end (trained on first use, cached, and by the CLI)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_calibrate, sample_text

import kvtrim
from kvtrim.calibration import gates, surrogates
from kvtrim.calibration.gates import GATE_PARTS, fit_fastkvzip, gate_log, train_gate
from kvtrim.calibration.surrogates import held_out_spearman
from kvtrim.core.errors import KVTrimError
from kvtrim.scorers import make_scorer
from kvtrim.strategies.surrogates import kvzip_teacher

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def planted_gate(
    n_features: int, n_kv: int, rank: int, n_sinks: int, seed: int, bias: float | None = None
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "down": torch.randn(n_features, n_kv, rank, generator=gen) / n_features**0.5,
        "self_weight": torch.randn(n_kv, rank, generator=gen),
        "bias": torch.randn(n_kv, generator=gen) if bias is None else torch.full((n_kv,), bias),
        "sinks": torch.randn(n_kv, n_sinks, rank, generator=gen),
        "feature_mean": torch.zeros(n_features),
        "feature_scale": torch.ones(n_features),
    }


def slow_gate(gate: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """g = e^a / (e^a + Σ_j e^{s_j·q}) per row and head, written out (float64)."""
    g = {k: v.double() for k, v in gate.items()}
    out = torch.empty(x.shape[0], g["bias"].shape[0], dtype=torch.float64)
    for n, row in enumerate(x.double()):
        z = (row - g["feature_mean"]) / g["feature_scale"]
        for h in range(out.shape[1]):
            q = z @ g["down"][:, h]  # (r,)
            own = torch.exp(q @ g["self_weight"][h] + g["bias"][h])
            out[n, h] = own / (own + torch.exp(g["sinks"][h] @ q).sum())
    return out


def test_the_gate_is_a_sink_attention():
    gate = planted_gate(6, 2, 3, 2, seed=1)
    x = torch.randn(20, 6)
    torch.testing.assert_close(gate_log(gate, x).exp().double(), slow_gate(gate, x), rtol=1e-5, atol=1e-7)


def test_training_recovers_a_planted_gate_and_is_deterministic():
    planted = planted_gate(12, 2, 4, 2, seed=0)
    x = torch.randn(5000, 12, generator=torch.Generator().manual_seed(1))
    y = gate_log(planted, x).exp()  # (N, Hkv) in (0, 1)
    fitted = train_gate(x[:4000], y[:4000], rank=4, n_sinks=2, steps=1000, batch=1024)
    predicted = gate_log(fitted, x[4000:])
    assert held_out_spearman(predicted, y[4000:]) > 0.999
    assert float((predicted - y[4000:].log()).abs().mean()) < 0.01  # the scores, not only their order
    again = train_gate(x[:4000], y[:4000], rank=4, n_sinks=2, steps=1000, batch=1024)
    assert all(torch.equal(fitted[name], again[name]) for name in GATE_PARTS)


def test_the_whole_pipeline_learns_a_planted_teacher(llama, tok, monkeypatch):
    n_kv, hidden = llama.config.num_key_value_heads, llama.config.hidden_size
    # the own logit starts below the sinks' so that no head's gate saturates at 1 (a constant)
    planted = [planted_gate(hidden, n_kv, 4, 2, seed=10 + layer, bias=-1.0) for layer in range(3)]

    def teacher(model, tokenizer, text, seed):
        out = {}
        for idx, (states, _) in kvzip_teacher(model, tokenizer, text, seed).items():
            scores = gate_log(planted[idx], states).exp().T.contiguous()  # (Hkv, T)
            scores[:, :2] = torch.inf  # sinks: left out of the fit
            out[idx] = (states, scores)
        return out

    monkeypatch.setitem(surrogates._TEACHERS, "planted", teacher)
    texts = [sample_text(3000, seed=s) for s in range(3)]
    fitted = fit_fastkvzip(
        llama, tok, texts, n_sequences=4, seq_len=200, teacher="planted", rank=4, steps=800
    )
    assert fitted["trained"].all() and fitted["down"].shape == (3, hidden, n_kv, 4)
    assert float(fitted["spearman"].min()) > 0.95  # held out: the fourth window


def test_fastkvzip_trains_on_first_use_is_cached_and_keeps_sinks_and_window(llama, tok):
    session = kvtrim.compress(llama, tok, sample_text(400), method="fastkvzip:window=16", ratio=0.5)
    assert session.stats.kv_tokens_after < session.stats.kv_tokens_before
    assert gates.fastkvzip_path(llama).is_file()
    stored = gates.load_or_fit_fastkvzip(llama, tok)  # read back, verified
    assert stored["down"].shape[:3] == (3, llama.config.hidden_size, llama.config.num_key_value_heads)
    scorer = make_scorer("fastkvzip:window=16", gates=stored)
    from test_methods import capture_views

    view = capture_views("llama", 300)[1][-1]
    scores = scorer.score(view)  # (1, Hkv, T)
    assert torch.isinf(scores[..., :4]).all() and torch.isinf(scores[..., -16:]).all()
    middle = scores[..., 4:-16]
    assert torch.isfinite(middle).all() and (middle > 0).all() and (middle < 1).all()
    assert isinstance(session.ask("Which word?", max_new_tokens=3), str)


def test_fastkvzip_refuses_what_it_cannot_do(llama, tok):
    with pytest.raises(KVTrimError, match="does not support chunked prefill"):
        kvtrim.compress(llama, tok, sample_text(200), spec="fastkvzip@0.5/chunk=64")
    with pytest.raises(KVTrimError, match="n_sink and window"):
        make_scorer("fastkvzip:window=-1")


def test_calibrate_cli_trains_the_gates_and_reports_the_fit(tmp_path):
    """In a fresh process, as a user runs it."""
    result = run_calibrate(tmp_path, "fastkvzip", sequences=4)
    assert result.returncode == 0, result.stderr
    assert "Fast KVzip gates (3, 64, 2, 16)" in result.stdout
    assert "Held-out Spearman with KVzip: mean" in result.stdout
    assert "training Fast KVzip gates" in result.stderr  # the progress bar
