"""Expected Attention with calibrated query statistics, CriticalKV and the DuoAttention head split,
each against a slow reference written plainly here (float64 loops on batch 0)."""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text
from test_methods import capture_views

import kvtrim
import kvtrim.calibration as calibration
from kvtrim.calibration import calibration_sequences, compute_query_stats, load_or_compute_query_stats
from kvtrim.errors import KVTrimError
from kvtrim.methods import METHODS, LayerView, make_scorer
from kvtrim.methods.expected_attention import ExpectedAttention

views_of = functools.cache(capture_views)  # the views are only read: build each model once


def close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-7) -> None:
    """Same shape, same infinite entries, finite entries equal within tolerance."""
    got, expected = got.double(), expected.double()
    assert got.shape == expected.shape
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=rtol, atol=atol)


# ---------------------------------------------------------------- expected attention, calibrated


def plain_query_stats(model, tokenizer, texts, n_sequences, seq_len, skip_first=4):
    """Every pre-RoPE query of every sequence, recomputed from the attention's input, then
    torch.mean / torch.cov in float64."""
    seqs = calibration_sequences(model, tokenizer, texts, n_sequences, seq_len)
    layers = model.model.layers
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def grab(i):
        def hook(_m, _args, kwargs):
            inputs[i].append(kwargs["hidden_states"][0].double())  # (T, hidden)

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for seq in seqs:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    for handle in handles:
        handle.remove()
    means, covs = [], []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        d, n_heads = attn.head_dim, model.config.num_attention_heads
        per_head = [[] for _ in range(n_heads)]
        for hidden in inputs[i]:
            with torch.no_grad():
                q = (hidden @ attn.q_proj.weight.double().T).view(-1, n_heads, d)  # (T, H, D)
                if hasattr(attn, "q_norm"):
                    q = attn.q_norm.double()(q)
                    attn.q_norm.float()
            for h in range(n_heads):
                per_head[h].append(q[skip_first:, h])
        stacked = [torch.cat(rows) for rows in per_head]  # H × (N, D)
        means.append(torch.stack([x.mean(0) for x in stacked]))
        covs.append(torch.stack([torch.cov(x.T, correction=0) for x in stacked]))
    return torch.stack(means), torch.stack(covs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_calibrated_query_stats_equal_a_plain_reference(arch, tokenizer):
    model = make_model(arch)
    texts = [sample_text(1500, seed=s) for s in range(2)]
    mean, cov = compute_query_stats(model, tokenizer, texts, n_sequences=3, seq_len=300)
    cfg = model.config
    assert mean.shape == (cfg.num_hidden_layers, cfg.num_attention_heads, 16)
    assert cov.shape == (*mean.shape, 16)
    ref_mean, ref_cov = plain_query_stats(model, tokenizer, texts, 3, 300)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cov.double(), ref_cov, rtol=1e-4, atol=1e-3)


def slow_expected_attention_given(
    view: LayerView, mu, sigma, rot, n_sink: int, use_cov: bool
) -> torch.Tensor:
    """The paper's closed form per query head with the given μ (H, D), Σ (H, D, D)."""
    keys, values = view.keys[0].double(), view.values[0].double()  # (Hkv, T, D)
    k_ok = view.key_positions >= n_sink
    rot = rot.double()
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for j in range(view.n_kv_heads):
        probs_sum = torch.zeros(keys.shape[1], dtype=torch.float64)
        for g in range(view.group_size):
            h = j * view.group_size + g
            mu_bar = rot @ mu[h].double()
            sigma_bar = rot @ sigma[h].double() @ rot.T
            logits = torch.full((keys.shape[1],), -math.inf, dtype=torch.float64)
            for t in range(keys.shape[1]):
                if k_ok[t]:
                    k = keys[j, t]
                    logits[t] = view.scaling * mu_bar @ k
                    if use_cov:
                        logits[t] += 0.5 * view.scaling**2 * k @ sigma_bar @ k
            probs_sum += torch.softmax(logits, 0)
        out[j] = torch.where(k_ok, probs_sum / view.group_size * values[j].norm(dim=-1), torch.inf)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("use_cov", [True, False])
def test_calibrated_scorer_is_the_closed_form_with_those_stats(arch, use_cov):
    model, views = views_of(arch, 120)
    view = views[-1]
    gen = torch.Generator().manual_seed(1)
    n_layers, h, d = len(views), view.n_heads, view.head_dim
    mean = torch.randn(n_layers, h, d, generator=gen)
    factor = torch.randn(n_layers, h, d, d, generator=gen) * 0.3
    cov = factor @ factor.transpose(-1, -2)  # (L, H, D, D) positive semi-definite
    scorer = make_scorer("expected-attention-calibrated", query_stats=(mean, cov), use_covariance=use_cov)
    start = int(view.query_positions[-1]) + 1
    rot = view.mean_rotation(torch.arange(start, start + scorer.n_future_positions))
    expected = slow_expected_attention_given(view, mean[view.layer_idx], cov[view.layer_idx], rot, 4, use_cov)
    close(scorer.score(view)[0], expected)
    # the context's own statistics give other scores: the option is not ignored
    assert not torch.allclose(ExpectedAttention(use_covariance=use_cov).score(view), scorer.score(view))


def test_calibrated_stats_are_cached_on_disk(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    model = make_model("qwen3")
    small = dict(n_sequences=2, seq_len=200)
    monkeypatch.setattr(calibration, "bundled_texts", lambda: [sample_text(3000, seed=3)])
    mean, cov = load_or_compute_query_stats(model, tokenizer, **small)
    assert [p.name for p in tmp_path.rglob("*.safetensors")] == ["query_stats.safetensors"]
    monkeypatch.setattr(calibration, "compute_query_stats", lambda *a, **k: pytest.fail("recomputed"))
    again = load_or_compute_query_stats(model, None)  # from disk: no tokenizer needed
    torch.testing.assert_close(again[0], mean)
    torch.testing.assert_close(again[1], cov)
    session = kvtrim.compress(
        model, tokenizer, sample_text(200), method="expected-attention-calibrated", ratio=0.5
    )
    assert session.stats.kv_bytes_after < session.stats.kv_bytes_before
    assert isinstance(session.ask("alpha?", max_new_tokens=3), str)


def test_calibrated_stats_recomputed_when_missing_or_stale(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    model = make_model("llama")
    with pytest.raises(KVTrimError, match="calibrate"):
        load_or_compute_query_stats(model, None)
    monkeypatch.setattr(calibration, "bundled_texts", lambda: [sample_text(3000, seed=3)])
    load_or_compute_query_stats(model, tokenizer, n_sequences=1, seq_len=100)
    monkeypatch.setattr(calibration, "QUERY_STATS_VERSION", calibration.QUERY_STATS_VERSION + 1)
    calls = []
    real = calibration.compute_query_stats
    monkeypatch.setattr(calibration, "compute_query_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_or_compute_query_stats(model, tokenizer, n_sequences=1, seq_len=100)
    assert calls == [1]


def test_bad_stats_source_is_a_user_error():
    with pytest.raises(KVTrimError, match="stats"):
        make_scorer("expected-attention", stats="future")
    assert METHODS["expected-attention-calibrated"].paper.startswith("arXiv")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    make_model("qwen3", max_positions=512).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvtrim.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_calibrates_query_stats(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(2000, seed=5))
    args = ["calibrate", "--model", tiny_dir, "--text", str(text), "--sequences", "2", "--length", "200"]
    result = run_cli(*args, "--what", "query-stats")
    assert result.returncode == 0, result.stderr
    assert "Query statistics (3, 4, 16) saved" in result.stdout
    assert [p.name for p in (tmp_path / "cache").rglob("*.safetensors")] == ["query_stats.safetensors"]
