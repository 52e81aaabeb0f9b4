"""KVzap: the closed-form fit recovers a planted linear score exactly and is deterministic; the
KVzip teacher gives aligned hidden states and scores; the scorer is the fitted map, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_calibrate, sample_text

import kvtrim
from kvtrim.calibration import surrogates
from kvtrim.calibration.surrogates import fit_kvzap, fit_linear, predict_linear, spearman
from kvtrim.core.errors import KVTrimError
from kvtrim.scorers import make_scorer
from kvtrim.strategies.surrogates import kvzip_teacher

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def test_fit_linear_recovers_a_planted_map_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen, dtype=torch.float64)
    planted = torch.randn(13, 3, generator=gen, dtype=torch.float64)  # the last row is the bias
    y = x @ planted[:-1] + planted[-1]
    torch.testing.assert_close(fit_linear(x, y, ridge=0.0), planted, rtol=1e-9, atol=1e-9)
    assert torch.allclose(predict_linear(planted, x), y)


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def planted_teacher(weights: torch.Tensor):
    """A teacher whose scores are exp of a planted linear map of the real hidden states."""

    def teacher(model, tokenizer, text, seed):
        out = {}
        for idx, (hidden, _) in kvzip_teacher(model, tokenizer, text, seed).items():
            scores = predict_linear(weights[idx].double(), hidden.double()).exp().T.float()  # (Hkv, T)
            scores[:, :2] = torch.inf  # sinks: left out of the fit
            out[idx] = (hidden, scores)
        return out

    return teacher


def test_the_fit_recovers_a_planted_score_through_the_whole_pipeline(llama, tok, monkeypatch):
    n_layers, hidden, n_kv = 3, llama.config.hidden_size, llama.config.num_key_value_heads
    gen = torch.Generator().manual_seed(3)
    planted = torch.randn(n_layers, hidden + 1, n_kv, generator=gen, dtype=torch.float64) * 0.05
    monkeypatch.setitem(surrogates._TEACHERS, "planted", planted_teacher(planted))
    texts = [sample_text(2000, seed=s) for s in range(3)]
    fitted = fit_kvzap(llama, tok, texts, n_sequences=3, seq_len=200, ridge=1e-10, teacher="planted")
    assert fitted["trained"].all()
    assert torch.allclose(fitted["spearman"], torch.ones(n_layers), atol=1e-6)  # held-out ranks exact
    # the planted score itself, on new text (the weights may differ where the hidden states span
    # fewer directions than they have: a few-character vocabulary)
    for idx, (hidden, _) in kvzip_teacher(llama, tok, sample_text(300, seed=9), 0).items():
        got = predict_linear(fitted["weights"][idx].double(), hidden.double())
        torch.testing.assert_close(got, predict_linear(planted[idx], hidden.double()), rtol=1e-4, atol=1e-4)


def test_the_kvzip_teacher_and_a_deterministic_fit(llama, tok):
    text = sample_text(300)
    sample = kvzip_teacher(llama, tok, text, 0)
    assert sorted(sample) == [0, 1, 2]
    hidden, scores = sample[1]
    assert hidden.shape == (scores.shape[1], llama.config.hidden_size)
    assert scores.shape[0] == llama.config.num_key_value_heads
    assert torch.isinf(scores[:, :4]).all()  # KVzip's sinks
    assert (scores[:, 4:] > 0).all() and (scores[:, 4:] <= 1).all()
    texts = [sample_text(3000, seed=s) for s in range(2)]
    first = fit_kvzap(llama, tok, texts, n_sequences=4, seq_len=150)
    again = fit_kvzap(llama, tok, texts, n_sequences=4, seq_len=150)
    for key in ("weights", "trained"):
        assert torch.equal(first[key], again[key])
    assert not math.isnan(float(first["spearman"].nanmean()))


def test_the_scorer_is_the_fitted_map(llama, tok):
    weights = torch.randn(3, llama.config.hidden_size + 1, llama.config.num_key_value_heads)
    scorer = make_scorer("kvzap", weights=weights)
    session = kvtrim.compress(llama, tok, sample_text(200), method=scorer, ratio=0.5)
    assert session.stats.kv_tokens_after < session.stats.kv_tokens_before
    assert isinstance(session.ask("Which word?", max_new_tokens=3), str)


def test_kvzap_trains_on_first_use_and_is_cached(llama, tok):
    from kvtrim.calibration import kvzap_path

    session = kvtrim.compress(llama, tok, sample_text(200), method="kvzap", ratio=0.5)
    assert session.stats.kv_tokens_after < session.stats.kv_tokens_before
    assert kvzap_path(llama).is_file()
    stored = surrogates.load_or_fit_kvzap(llama, tok)  # read back, verified
    assert stored["weights"].shape == (3, llama.config.hidden_size + 1, llama.config.num_key_value_heads)


def test_kvzap_refuses_chunked_prefill(llama, tok):
    with pytest.raises(KVTrimError, match="does not support chunked prefill"):
        kvtrim.compress(llama, tok, sample_text(200), spec="kvzap@0.5/chunk=64")


def test_calibrate_cli_reports_the_fit(tmp_path):
    """In a fresh process (nothing imported beforehand), as a user runs it."""
    result = run_calibrate(tmp_path, "kvzap", sequences=4)
    assert result.returncode == 0, result.stderr
    assert "KVzap weights (3, 65, 2)" in result.stdout
    assert "Held-out Spearman with KVzip: mean" in result.stdout


def test_surrogates_calibrate_on_prose_and_records_taken_in_turn(tok):
    from kvtrim.calibration.corpus import calibration_windows, surrogate_texts
    from kvtrim.calibration.records import record_text

    assert record_text() == record_text() and sum(c.isdigit() for c in record_text()) > 10_000
    texts = surrogate_texts()
    assert texts[-1] == record_text() and len(texts) == 3
    a, b = sample_text(2000, seed=1), sample_text(300, seed=2)  # b holds one window
    windows = calibration_windows(tok, [a, b], 4, 200)
    assert [w in a for w in windows] == [True, False, True, True]  # a, b, a, a: each text in turn
    assert windows[1] in b
