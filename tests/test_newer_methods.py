"""The reference library's newer methods (non-causal chunked attention, Compactor, per-layer ratio
lists) against slow references written from their papers, on views of tiny real models."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import close, make_model, make_tokenizer, sample_text
from test_methods import capture_views, rope_matrix

import kvtrim
from kvtrim.budgets import make_budget
from kvtrim.core.errors import KVTrimError
from kvtrim.scorers import make_scorer
from kvtrim.scorers.base import LayerView
from kvtrim.scorers.compactor import Compactor, sketched_leverage
from kvtrim.scorers.leverage import leverage_scores
from kvtrim.scorers.noncausal import NonCausalAttention

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

views_of = functools.cache(capture_views)


def last_view(arch: str = "llama", n_chars: int = 150) -> LayerView:
    view = views_of(arch, n_chars)[1][-1]
    assert torch.equal(view.query_positions, view.key_positions)
    return view


# ---------------------------------------------------------------- slow references (float64, loops)


def slow_received(view: LayerView, chunk: int, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(Hkv, M) attention each key of [start, end) gets from every query of its chunk, unscaled."""
    queries = view.queries(rotated=True)[0, :, start:end].double()  # (H, M, D)
    keys = view.keys[0, :, start:end].double()  # (Hkv, M, D)
    seq = keys.shape[1]
    out = torch.zeros(view.n_kv_heads, seq, dtype=torch.float64)
    for h in range(view.n_heads):
        for c in range(0, seq, chunk):
            q, k = queries[h, c : c + chunk], keys[h // view.group_size, c : c + chunk]
            out[h // view.group_size, c : c + chunk] += (
                torch.softmax(q @ k.T, dim=-1).sum(0) / view.group_size
            )
    return out


def z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def slow_noncausal(view: LayerView, chunk: int) -> torch.Tensor:
    scores = slow_received(view, chunk) * view.values[0].double().norm(dim=-1)  # (Hkv, T)
    return z(F.avg_pool1d(scores[None], 3, stride=1, padding=1)[0])


def slow_leverage(keys: torch.Tensor, sketch: torch.Tensor, jitter: float) -> torch.Tensor:
    """keys (T, D): diag(X (XᵀX + jitter·I)⁻¹ Xᵀ) with X = (K − mean)·sketch, by an explicit inverse."""
    x = (keys.double() - keys.double().mean(0)) @ sketch.double()  # (T, k)
    inverse = torch.linalg.inv(x.T @ x + jitter * torch.eye(x.shape[1], dtype=torch.float64))
    return torch.stack([x[t] @ inverse @ x[t] for t in range(x.shape[0])])


def unrotate(view: LayerView, keys: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Pre-RoPE keys (Hkv, M, D) from the cached ones, each rotated back by its explicit RoPE matrix."""
    out = torch.empty_like(keys, dtype=torch.float64)
    for m, p in enumerate(positions.tolist()):
        rot = rope_matrix(p, view.head_dim, theta)  # (D, D)
        out[:, m] = keys[:, m].double() @ rot  # Rᵀ k = k @ R in row form
    return out


# ---------------------------------------------------------------- the scorers


@pytest.mark.parametrize("chunk", [16, 64, 1000])
def test_noncausal_attention_matches_the_slow_reference(chunk):
    view = last_view()
    got = NonCausalAttention(chunk_size=chunk).score(view)[0]  # (Hkv, T)
    close(got, slow_noncausal(view, chunk), rtol=1e-4, atol=1e-5)


def test_noncausal_attention_sees_the_future():
    """Unlike causal attention, the first key of a chunk is not favoured by construction: it gets
    attention from every query of its chunk, and so does the last."""
    view = last_view()
    received = slow_received(view, 32)
    assert torch.allclose(
        received.sum(-1), torch.full((view.n_kv_heads,), float(view.keys.shape[2]), dtype=torch.float64)
    )


def test_sketched_leverage_with_the_identity_sketch_is_the_exact_leverage():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64)
    exact = leverage_scores(keys - keys.mean(dim=2, keepdim=True))
    approx = sketched_leverage(keys, torch.eye(8, dtype=torch.float32), jitter=1e-9)
    torch.testing.assert_close(approx.double(), exact, rtol=1e-4, atol=1e-5)


def test_compactor_matches_the_slow_reference():
    model, views = views_of("llama", 150)
    view = last_view()
    seq = view.keys.shape[2]
    scorer = Compactor(chunk_size=32, sketch_dimension=8, blending=0.5)
    got = scorer.score(view)[0]  # (Hkv, T)
    start, end = scorer.sink_start, seq - scorer.sink_end
    assert torch.isinf(got[:, :start]).all() and torch.isinf(got[:, end:]).all()
    gen = torch.Generator().manual_seed(view.seed * 1000 + view.layer_idx)
    sketch = torch.randn(view.head_dim, 8, generator=gen) / math.sqrt(8)
    theta = model.config.rope_theta if hasattr(model.config, "rope_theta") else 10000.0
    pre_rope = unrotate(view, view.keys[0, :, start:end], view.key_positions[start:end], theta)
    leverage = torch.stack([slow_leverage(pre_rope[h], sketch, 1e-2) for h in range(view.n_kv_heads)])
    attention = slow_received(view, 32, start, end) * view.values[0, :, start:end].double().norm(dim=-1)
    attention = F.avg_pool1d(attention[None], 3, stride=1, padding=1)[0]
    expected = 0.5 * z(leverage) + z(attention)
    close(got[:, start:end], expected, rtol=1e-3, atol=1e-3)


def test_compactor_blends_by_the_ratio_the_budget_asks_for():
    view = last_view()
    seq = view.keys.shape[2]
    view.budget_keep = seq // 4
    assert Compactor().blend_weight(view) == pytest.approx(0.75, abs=0.01)
    view.budget_keep = None
    assert Compactor().blend_weight(view) == 0.35
    assert Compactor(blending=0.1).blend_weight(view) == 0.1


@pytest.mark.parametrize("method", ["non-causal-attention", "compactor"])
def test_the_new_scorers_compress_and_answer(method):
    model, tok = make_model("qwen3"), make_tokenizer()
    session = kvtrim.compress(model, tok, sample_text(300), method=method, ratio=0.5)
    assert session.stats.kv_tokens_after < session.stats.kv_tokens_before
    assert isinstance(session.ask("Which word?", max_new_tokens=3), str)


def test_the_new_scorers_refuse_chunked_prefill_clearly():
    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(KVTrimError, match="does not support chunked prefill"):
        kvtrim.compress(model, tok, sample_text(200), spec="compactor@0.5/chunk=64")
    with pytest.raises(KVTrimError, match="chunk_size must be >= 1"):
        make_scorer("non-causal-attention:chunk_size=0")


def slow_capkv(view: LayerView, tau: float, n_future: int, n_sink: int, eps: float) -> torch.Tensor:
    """CAPKV per query head with explicit loops and an explicit inverse, float64."""
    queries = view.queries()[0, :, n_sink:].double()  # (H, M, D) pre-RoPE
    start = int(view.query_positions[-1]) + 1
    rotated = torch.stack(  # mean over future positions of each query's rotation, one at a time
        [
            view.rotate(queries[None].float(), torch.full((queries.shape[1],), p)).double()[0]
            for p in range(start, start + n_future)
        ]
    ).mean(0)  # (H, M, D)
    keys, values = view.keys[0, :, n_sink:].double(), view.values[0, :, n_sink:].double()
    out = torch.zeros(view.n_kv_heads, keys.shape[1], dtype=torch.float64)
    for h in range(view.n_heads):
        j = h // view.group_size
        mu = rotated[h].mean(0)
        cos = torch.stack([torch.dot(mu / mu.norm(), k / k.norm()) for k in keys[j]])
        w = torch.exp(tau * cos - (tau * cos).max())
        a = torch.eye(values.shape[-1], dtype=torch.float64)
        for i in range(keys.shape[1]):
            a += (w[i] + eps) * torch.outer(values[j, i], values[j, i])
        inverse = torch.linalg.inv(a)
        out[j] += torch.stack([w[i] * values[j, i] @ inverse @ values[j, i] for i in range(keys.shape[1])])
    return out / view.group_size


def test_capkv_matches_the_slow_reference():
    view = last_view("qwen3", 80)
    got = make_scorer("capkv:n_future_positions=16").score(view)[0]  # (Hkv, T)
    assert torch.isinf(got[:, :4]).all()
    close(got[:, 4:], slow_capkv(view, 5.0, 16, 4, 1e-6), rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- the per-layer ratio budget


def test_layer_ratios_give_each_layer_its_own_count():
    budget = make_budget("layers:ratios=[0.25,0.5,0.75]")
    assert [budget.layer_keep(100, i, 3, 0.9) for i in range(3)] == [75, 50, 25]  # the spec's 0.9 is ignored
    curve = make_budget("layers:ratios=[0.0,0.8]")  # a curve over 5 layers
    assert [round(curve.layer_ratio(i, 5), 6) for i in range(5)] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert make_budget("layers:ratios=[0.5]").layer_keep(10, 3, 7, 0.0) == 5
    assert not make_budget("layers:ratios=[0.0]").evicts(100, 0.5)


def test_layer_ratios_are_checked():
    with pytest.raises(KVTrimError, match="ratios"):
        make_budget("layers")
    with pytest.raises(KVTrimError, match="ratio must be in"):
        make_budget("layers:ratios=[0.5,1.5]")
    with pytest.raises(KVTrimError, match="a JSON list"):
        make_budget("layers:ratios=0.5")


def test_layer_ratios_compress_each_layer_as_listed():
    model, tok = make_model("llama"), make_tokenizer()
    session = kvtrim.compress(model, tok, sample_text(200), spec="knorm@0.5+layers:ratios=[0.0,0.5,0.75]")
    kept = [layer.keys.shape[2] for layer in session.cache.layers]
    seq = session.context_length
    budget = make_budget("layers:ratios=[0.0,0.5,0.75]")
    assert kept == [budget.layer_keep(seq, i, 3, 0.5) for i in range(3)]
    assert kept[0] == seq > kept[1] > kept[2]
