"""Every scorer against a slow reference written here, on views captured from real (tiny) models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.calibration import dominant_direction, load_or_compute_qfilters
from kvtrim.core.selection import top_indices
from kvtrim.scorers import ExpectedAttention, KNorm, LayerView, Scorer
from kvtrim.scorers.expected_attention import expected_logits
from kvtrim.scorers.qfilters import QFilters
from kvtrim.scorers.simple import RandomScorer, StreamingLLM


class Spy(Scorer):
    """Records the views the engine builds (and keeps everything: scores are positions)."""

    name = "spy"

    def __init__(self):
        self.views: list[LayerView] = []

    def score(self, view):
        self.views.append(view)
        return view.key_positions.float().expand(*view.keys.shape[:2], -1)


def capture_views(arch: str = "llama", n_chars: int = 120) -> tuple[torch.nn.Module, list[LayerView]]:
    model = make_model(arch)
    from conftest import make_tokenizer

    spy = Spy()
    kvtrim.compress(model, make_tokenizer(), sample_text(n_chars), method=spy, ratio=0.5)
    return model, spy.views


def rope_matrix(position: int, head_dim: int, theta: float) -> torch.Tensor:
    """Explicit RoPE rotation (rotate-half convention): pairs (i, i + D/2) turn by position·θ_i."""
    half = head_dim // 2
    rot = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    for i in range(half):
        angle = position * theta ** (-2 * i / head_dim)
        c, s = math.cos(angle), math.sin(angle)
        rot[i, i], rot[i, i + half], rot[i + half, i], rot[i + half, i + half] = c, -s, s, c
    return rot


def test_view_queries_match_an_independent_computation():
    model, views = capture_views("llama")
    view = views[0]
    captured = {}
    attn = model.model.layers[0].self_attn

    def grab(_module, _args, kwargs, _out):
        captured.setdefault("h", kwargs["hidden_states"])

    handle = attn.register_forward_hook(grab, with_kwargs=True)
    from conftest import make_tokenizer

    kvtrim.compress(model, make_tokenizer(), sample_text(120), method="none")
    handle.remove()
    hidden = captured["h"]  # (1, T, hidden)
    with torch.inference_mode():
        q = attn.q_proj(hidden).view(1, hidden.shape[1], -1, attn.head_dim).transpose(1, 2)  # (1, H, T, D)
    torch.testing.assert_close(view.queries(), q)
    theta = model.config.rope_parameters["rope_theta"]
    for t in (0, 7, hidden.shape[1] - 1):
        expected = q[0, :, t].double() @ rope_matrix(t, attn.head_dim, theta).T
        torch.testing.assert_close(
            view.queries(rotated=True)[0, :, t].double(), expected, atol=1e-5, rtol=1e-5
        )


def test_mean_rotation_matches_explicit_matrices():
    model, views = capture_views("llama")
    view = views[1]
    theta = model.config.rope_parameters["rope_theta"]
    positions = torch.arange(50, 90)
    reference = sum(rope_matrix(int(p), view.head_dim, theta) for p in positions) / len(positions)
    torch.testing.assert_close(view.mean_rotation(positions).double(), reference, atol=1e-5, rtol=1e-5)


def test_expected_logits_match_monte_carlo():
    torch.manual_seed(0)
    d, n_keys, scaling = 6, 5, 1 / math.sqrt(6)
    mean = torch.randn(1, 1, d) * 0.5
    factor = torch.randn(d, d) * 0.3
    cov = (factor @ factor.T)[None, None]  # (1, 1, D, D)
    keys = torch.randn(1, 1, n_keys, d)
    closed = expected_logits(keys, mean, cov, scaling)[0, 0]  # (T,)
    gaussian = torch.distributions.MultivariateNormal(mean[0, 0].double(), cov[0, 0].double())
    samples = gaussian.sample((400_000,))  # (N, D)
    monte_carlo = torch.logsumexp(scaling * samples @ keys[0, 0].double().T, dim=0) - math.log(len(samples))
    torch.testing.assert_close(closed.double(), monte_carlo, atol=0.01, rtol=0.0)


def slow_expected_attention(
    view: LayerView, rot: torch.Tensor, n_sink: int, eps: float, vnorm: bool, use_cov: bool = True
) -> torch.Tensor:
    """Loop-by-loop Expected Attention, straight from the paper's definition."""
    queries = view.queries()[0].double()  # (H, Tq, D)
    keys, values = view.keys[0].double(), view.values[0].double()  # (Hkv, T, D)
    q_ok = view.query_positions >= n_sink
    k_ok = view.key_positions >= n_sink
    rot = rot.double()
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for j in range(view.n_kv_heads):
        probs_sum = torch.zeros(keys.shape[1], dtype=torch.float64)
        for g in range(view.group_size):
            q = queries[j * view.group_size + g][q_ok]
            mu = q.mean(0)
            sigma = (
                (q - mu).T @ (q - mu) / len(q)
                if use_cov
                else torch.zeros(len(mu), len(mu), dtype=torch.float64)
            )
            mu_bar, sigma_bar = rot @ mu, rot @ sigma @ rot.T
            logits = torch.full((keys.shape[1],), -math.inf, dtype=torch.float64)
            for t in range(keys.shape[1]):
                if k_ok[t]:
                    k = keys[j, t]
                    logits[t] = view.scaling * mu_bar @ k + 0.5 * view.scaling**2 * k @ sigma_bar @ k
            probs_sum += torch.softmax(logits, 0)
        score = probs_sum / view.group_size
        if vnorm:
            score = (score + eps) * values[j].norm(dim=-1)
        out[j] = torch.where(k_ok, score, torch.inf)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize(
    "options", [dict(), dict(epsilon=1e-2, n_sink=2), dict(use_vnorm=False, use_covariance=False)]
)
def test_expected_attention_matches_slow_reference(arch, options):
    _, views = capture_views(arch)
    view = views[-1]
    scorer = ExpectedAttention(**options)
    start = int(view.query_positions[-1]) + 1
    rot = view.mean_rotation(torch.arange(start, start + scorer.n_future_positions))
    expected = slow_expected_attention(
        view, rot, scorer.n_sink, scorer.epsilon, scorer.use_vnorm, scorer.use_covariance
    )
    got = scorer.score(view)[0].double()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-9)


def test_knorm_keeps_smallest_norms():
    _, views = capture_views("qwen2")
    view = views[1]  # past layer 0 keys depend on context, so no two norms tie
    scores = KNorm().score(view)
    for j in range(view.n_kv_heads):
        norms = [float(view.keys[0, j, t].double().norm()) for t in range(view.keys.shape[2])]
        kept = set(top_indices(scores, 10)[0, j].tolist())
        assert kept == set(sorted(range(len(norms)), key=lambda t: norms[t])[:10])


def test_top_indices_prefers_recent_on_ties_and_sorts_positions():
    scores = torch.tensor([[[1.0, 5.0, 1.0, 1.0, 5.0, 0.0]]])
    assert top_indices(scores, 3).tolist() == [[[1, 3, 4]]]
    assert top_indices(scores, 6).tolist() == [[[0, 1, 2, 3, 4, 5]]]


def test_streaming_llm_keeps_sinks_and_recent():
    _, views = capture_views("mistral", n_chars=60)
    view = views[0]
    seq = view.keys.shape[2]
    kept = top_indices(StreamingLLM(n_sink=4).score(view), 20)[0, 0].tolist()
    assert kept == [0, 1, 2, 3, *range(seq - 16, seq)]


def test_random_is_seeded_and_varies_by_layer():
    _, views = capture_views("llama")
    a, b = RandomScorer().score(views[0]), RandomScorer().score(views[0])
    assert torch.equal(a, b)
    assert not torch.equal(a, RandomScorer().score(views[1]))


def test_dominant_direction_finds_and_orients_the_query_direction():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    for sign in (1.0, -1.0):
        queries = sign * 3.0 * u + 0.3 * torch.randn(500, 16)
        direction = dominant_direction(queries)
        assert float(direction @ (sign * u)) > 0.99  # oriented so most queries project positively
        assert float((queries @ direction > 0).float().mean()) > 0.5


def test_qfilters_score_is_projection_on_filter():
    _, views = capture_views("qwen3")
    view = views[2]
    filters = torch.randn(3, view.n_kv_heads, view.head_dim)
    scores = QFilters(filters=filters).score(view)
    for j in range(view.n_kv_heads):
        for t in (0, 5, view.keys.shape[2] - 1):
            assert scores[0, j, t].item() == pytest.approx(
                float(view.keys[0, j, t].double() @ filters[2, j].double()), abs=1e-5
            )


def test_qfilters_calibration_is_cached(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    model = make_model("llama")
    texts = [sample_text(3000, seed=s) for s in range(2)]
    filters = load_or_compute_qfilters(model, tokenizer, texts=texts, n_sequences=4, seq_len=256)
    cfg = model.config
    assert filters.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    assert list(tmp_path.rglob("qfilters.safetensors"))
    import kvtrim.calibration.artefacts as calibration

    monkeypatch.setattr(calibration, "compute_qfilters", lambda *a, **k: pytest.fail("recomputed"))
    torch.testing.assert_close(load_or_compute_qfilters(model, tokenizer), filters)
    session = kvtrim.compress(model, tokenizer, sample_text(200), method="qfilters", ratio=0.5)
    assert session.stats.kv_bytes_after < session.stats.kv_bytes_before
