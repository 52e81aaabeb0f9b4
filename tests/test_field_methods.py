"""The field's baseline scorers against slow references written plainly here.

Views come from tiny real models (``capture_views``); every reference builds the explicit causal
attention matrix (or loops over positions) in float64 on batch 0, straight from the papers'
definitions, and the scorer's output must match it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import close, make_model, make_tokenizer, sample_text
from test_methods import capture_views

import kvtrim
from kvtrim.core.errors import KVTrimError
from kvtrim.core.selection import top_indices
from kvtrim.scorers import METHODS, LayerView, make_scorer
from kvtrim.scorers.chunkkv import ChunkKV
from kvtrim.scorers.cur import CUR
from kvtrim.scorers.keydiff import KeyDiff
from kvtrim.scorers.lagkv import TAIL_SCORE, LagKV
from kvtrim.scorers.leverage import Leverage, leverage_scores
from kvtrim.scorers.observed_attention import ObservedAttention
from kvtrim.scorers.snapkv import SnapKV
from kvtrim.scorers.tova import TOVA

NEW_METHODS = ["snapkv", "tova", "observed-attention", "keydiff", "lagkv", "cur", "leverage", "chunkkv"]
ARCHS = ["llama", "qwen3", "phi3"]

views_of = functools.cache(capture_views)  # the views are only read: build each model once


def last_view(arch: str, n_chars: int = 120) -> LayerView:
    view = views_of(arch, n_chars)[1][-1]
    assert torch.equal(view.query_positions, view.key_positions)  # a prefill: Tq = T, positions 0..T-1
    return view


# ---------------------------------------------------------------- slow references


def full_attention(view: LayerView) -> torch.Tensor:
    """(H, T, T) causal softmax attention of every query head, built explicitly in float64."""
    queries = view.queries(rotated=True)[0].double()  # (H, T, D)
    keys = view.keys[0].double()  # (Hkv, T, D)
    seq = keys.shape[1]
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)  # query i cannot see key t > i
    out = torch.zeros(view.n_heads, seq, seq, dtype=torch.float64)
    for h in range(view.n_heads):
        logits = view.scaling * queries[h] @ keys[h // view.group_size].T  # (T, T)
        out[h] = torch.softmax(logits.masked_fill(future, -math.inf), dim=-1)
    return out


def slow_snapkv(view: LayerView, window: int, kernel: int) -> torch.Tensor:
    attn = full_attention(view)
    seq = attn.shape[-1]
    n = seq - window
    out = torch.full((view.n_kv_heads, seq), math.inf, dtype=torch.float64)
    for j in range(view.n_kv_heads):
        total = torch.zeros(n, dtype=torch.float64)
        for g in range(view.group_size):
            votes = attn[j * view.group_size + g, -window:, :n].mean(0)  # mean over the window's queries
            for t in range(n):
                neighbours = [votes[u] for u in range(t - kernel // 2, t + kernel // 2 + 1) if 0 <= u < n]
                total[t] += sum(neighbours) / kernel  # zero padding counts in the average
        out[j, :n] = total / view.group_size
    return out


def slow_tova(view: LayerView, per_kv_head: bool) -> torch.Tensor:
    last = full_attention(view)[:, -1]  # (H, T): the last query's attention
    out = torch.zeros(view.n_kv_heads, last.shape[1], dtype=torch.float64)
    for j in range(view.n_kv_heads):
        group = last[j * view.group_size : (j + 1) * view.group_size]
        out[j] = group.mean(0) if per_kv_head else last.mean(0)
    out[:, -1] = math.inf
    return out


def slow_observed(view: LayerView) -> torch.Tensor:
    attn = full_attention(view)
    seq = attn.shape[-1]
    out = torch.zeros(view.n_kv_heads, seq, dtype=torch.float64)
    for j in range(view.n_kv_heads):
        for t in range(seq):
            heads = range(j * view.group_size, (j + 1) * view.group_size)
            received = sum(float(attn[h, i, t]) for h in heads for i in range(t, seq))
            out[j, t] = received / ((seq - t) * view.group_size)  # queries t..T-1 saw key t
    return out


def slow_keydiff(view: LayerView) -> torch.Tensor:
    keys = view.keys[0].double()  # (Hkv, T, D)
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for j in range(keys.shape[0]):
        anchor = sum(k / k.norm() for k in keys[j]) / keys.shape[1]
        for t, k in enumerate(keys[j]):
            out[j, t] = -(k @ anchor) / (k.norm() * anchor.norm())
    return out


def slow_lagkv(view: LayerView, n_sink: int, lag: int, cross_scoring: bool) -> torch.Tensor:
    keys, values = view.keys[0].double(), view.values[0].double()  # (Hkv, T, D)
    seq = keys.shape[1]
    out = torch.full((keys.shape[0], seq), TAIL_SCORE, dtype=torch.float64)
    n_parts = (seq - n_sink) // lag
    for j in range(keys.shape[0]):
        for p in range(n_parts - 1):  # the last whole partition has no reference: kept with the tail
            start = n_sink + p * lag
            score = torch.zeros(lag, dtype=torch.float64)
            for states in (keys[j], values[j]):
                ref = states[start + lag : start + 2 * lag]
                low, high = ref.min(0).values, ref.max(0).values
                stds = []
                for t in range(start, start + lag):
                    x = (states[t] - low) / (high - low)
                    stds.append(math.sqrt(float(((x - x.mean()) ** 2).sum()) / (len(x) - 1)))
                score += torch.softmax(torch.tensor(stds, dtype=torch.float64), 0) / 2
            if not cross_scoring:
                order = sorted(range(lag), key=lambda i, s=score: float(s[i]))
                score = torch.tensor([order.index(i) / lag for i in range(lag)], dtype=torch.float64)
            out[j, start : start + lag] = score
    out[:, :n_sink] = math.inf
    return out


def slow_cur(view: LayerView, n_sink: int, window: int, leverage: str, local: bool) -> torch.Tensor:
    keys, values = view.keys[0].double(), view.values[0].double()  # (Hkv, T, D)
    n_kv, seq = keys.shape[:2]
    out = torch.zeros(n_kv, seq, dtype=torch.float64)
    for j in range(n_kv):
        k2 = [float(keys[j, t] @ keys[j, t]) for t in range(seq)]
        v2 = [float(values[j, t] @ values[j, t]) for t in range(seq)]
        if local:
            k2 = [k2[t] / sum(k2[t - t % window : t - t % window + window]) for t in range(seq)]
            v2 = [v2[t] / sum(v2[t - t % window : t - t % window + window]) for t in range(seq)]
        combine = {
            "kv_product": lambda a, b: a * b,
            "kv_avg": lambda a, b: (a + b) / 2,
            "key": lambda a, b: a,
            "value": lambda a, b: b,
        }[leverage]
        raw = [combine(a, b) for a, b in zip(k2, v2, strict=True)]
        out[j] = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    out[:, :n_sink] = math.inf
    return out


def slow_leverage(view: LayerView, center: bool) -> torch.Tensor:
    keys = view.keys[0].double()  # (Hkv, T, D)
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for j in range(keys.shape[0]):
        k = keys[j] - keys[j].mean(0) if center else keys[j]
        projection = k @ torch.linalg.inv(k.T @ k) @ k.T  # (T, T) hat matrix
        out[j] = torch.diagonal(projection)
    return out


def slow_chunk_scores(view: LayerView, chunk: int, window: int, kernel: int) -> list[float]:
    base = slow_snapkv(view, window, kernel).sum(0)  # (T,) summed over kv-heads
    seq = len(base)
    return [float(base[s : s + chunk].mean()) for s in range(0, seq, chunk)]


# ---------------------------------------------------------------- scorers against references


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3"])
@pytest.mark.parametrize("options", [dict(), dict(window=16, kernel_size=3), dict(window=8, kernel_size=1)])
def test_snapkv_matches_slow_reference(arch, options):
    view = last_view(arch)
    scorer = SnapKV(**options)
    close(scorer.score(view)[0], slow_snapkv(view, scorer.window, scorer.kernel_size))


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3"])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_tova_matches_slow_reference(arch, per_kv_head):
    view = last_view(arch)
    close(TOVA(per_kv_head=per_kv_head).score(view)[0], slow_tova(view, per_kv_head))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [256, 32, 7])
def test_observed_attention_blockwise_matches_full_matrix(arch, block_size):
    view = last_view(arch)
    assert view.keys.shape[2] > 32  # the small blocks really split the queries
    close(ObservedAttention(block_size=block_size).score(view)[0], slow_observed(view))


@pytest.mark.parametrize("arch", ARCHS)
def test_keydiff_matches_slow_reference(arch):
    view = last_view(arch)
    close(KeyDiff().score(view)[0], slow_keydiff(view), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "options", [dict(lag_size=16), dict(lag_size=16, n_sink=2, cross_scoring=True), dict(lag_size=40)]
)
def test_lagkv_matches_slow_reference(arch, options):
    view = last_view(arch)
    scorer = LagKV(**options)
    expected = slow_lagkv(view, scorer.n_sink, scorer.lag_size, scorer.cross_scoring)
    close(scorer.score(view)[0], expected)


def test_lagkv_defaults_on_a_longer_context():
    view = last_view("llama", n_chars=400)
    assert view.keys.shape[2] >= 4 + 2 * 128  # at least one partition is judged
    close(LagKV().score(view)[0], slow_lagkv(view, 4, 128, False))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(leverage="kv_avg", local_window=5),
        dict(leverage="key", local_approximation=False, n_sink=0),
    ],
)
def test_cur_matches_slow_reference(arch, options):
    view = last_view(arch)
    scorer = CUR(**options)
    expected = slow_cur(view, scorer.n_sink, scorer.local_window, scorer.leverage, scorer.local_approximation)
    close(scorer.score(view)[0], expected, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("center", [False, True])
def test_leverage_matches_hat_matrix_diagonal(arch, center):
    view = last_view(arch)
    got = Leverage(center=center).score(view)[0]
    close(got, slow_leverage(view, center), atol=1e-6)
    # a projection's diagonal sums to its rank: D, as T > D keys span the whole head space
    torch.testing.assert_close(
        got.sum(-1).double(), torch.full_like(got[:, 0].double(), view.head_dim), atol=1e-4, rtol=0
    )


def test_leverage_handles_rank_deficient_keys():
    keys = torch.randn(1, 1, 5, 16, dtype=torch.float64)  # T < D: every key is alone in its direction
    torch.testing.assert_close(leverage_scores(keys), torch.ones(1, 1, 5, dtype=torch.float64))
    repeated = torch.cat([keys, keys], dim=2)  # each direction is held by two equal keys: 1/2 each
    torch.testing.assert_close(leverage_scores(repeated), torch.full((1, 1, 10), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [dict(), dict(chunk_size=7, window=16)])
def test_chunkkv_matches_slow_reference(arch, options):
    view = last_view(arch)
    scorer = ChunkKV(**options)
    chunks = slow_chunk_scores(view, scorer.chunk_size, scorer.window, scorer.kernel_size)
    expected = torch.tensor([chunks[t // scorer.chunk_size] for t in range(view.keys.shape[2])])
    close(scorer.score(view)[0], expected.expand(view.n_kv_heads, -1))


# ---------------------------------------------------------------- shapes and keep-always properties


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NEW_METHODS)
def test_scores_have_one_entry_per_kv_head_and_position(arch, name):
    _, views = views_of(arch, 120)
    for view in views:
        scores = make_scorer(name).score(view)
        assert scores.shape == view.keys.shape[:3]  # (B, Hkv, T)
        assert not torch.isnan(scores).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_snapkv_always_keeps_its_window(arch):
    view = last_view(arch)
    seq = view.keys.shape[2]
    for window in (8, 64):
        kept = top_indices(SnapKV(window=window).score(view), window)
        assert (kept == torch.arange(seq - window, seq)).all()  # every head keeps exactly the window


@pytest.mark.parametrize("arch", ARCHS)
def test_tova_always_keeps_the_last_token(arch):
    view = last_view(arch)
    for per_kv_head in (False, True):
        scores = TOVA(per_kv_head=per_kv_head).score(view)
        assert (top_indices(scores, 1) == view.keys.shape[2] - 1).all()
    layer_wide = TOVA().score(view)
    assert (layer_wide == layer_wide[:, :1]).all()  # the paper's layer average: one ranking per layer


@pytest.mark.parametrize("arch", ARCHS)
def test_lagkv_keeps_sinks_first_then_the_tail(arch):
    view = last_view(arch)
    seq = view.keys.shape[2]
    scorer = LagKV(lag_size=16)
    scores = scorer.score(view)
    end = 4 + (seq - 4) // 16 * 16
    tail = list(range(end - 16, seq))
    assert (top_indices(scores, 4) == torch.arange(4)).all()
    assert (top_indices(scores, 4 + len(tail)) == torch.tensor([0, 1, 2, 3, *tail])).all()
    short = LagKV().score(view)  # T < 4 + 2·128: nothing judged, sinks + most recent
    assert (top_indices(short, 20) == torch.tensor([0, 1, 2, 3, *range(seq - 16, seq)])).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [20, 7])
def test_chunkkv_keeps_whole_chunks_shared_by_all_heads(arch, chunk_size):
    view = last_view(arch)
    seq = view.keys.shape[2]
    scores = ChunkKV(chunk_size=chunk_size, window=16).score(view)
    chunks = [list(range(s, min(s + chunk_size, seq))) for s in range(0, seq, chunk_size)]
    chunk_score = [float(scores[0, 0, c[0]]) for c in chunks]
    # best chunks first; equal (infinite: window) chunks by recency, as the engine breaks ties
    ranking = sorted(range(len(chunks)), key=lambda c: (chunk_score[c], c), reverse=True)
    kept_chunks: list[int] = []
    for c in ranking:
        kept_chunks.append(c)
        budget = sum(len(chunks[k]) for k in kept_chunks)  # a multiple of chunk_size until the short one
        expected = sorted(t for k in kept_chunks for t in chunks[k])
        kept = top_indices(scores, budget)  # (B, Hkv, budget)
        assert (kept == torch.tensor(expected)).all()  # the same whole chunks in every head


def test_bad_options_raise_user_errors():
    for name, options in [
        ("snapkv", dict(kernel_size=4)),
        ("chunkkv", dict(chunk_size=0)),
        ("observed-attention", dict(block_size=0)),
        ("lagkv", dict(lag_size=1)),
        ("cur", dict(leverage="nope")),
        ("tova", dict(window=3)),
    ]:
        with pytest.raises(KVTrimError):
            make_scorer(name, **options)


# ---------------------------------------------------------------- end to end


def test_every_new_method_is_registered():
    for name in NEW_METHODS:
        cls = METHODS[name]
        assert cls.summary and cls.paper.startswith("arXiv")


@pytest.mark.parametrize("name", NEW_METHODS)
def test_compress_runs_with_every_new_method(name):
    model = make_model("qwen3")
    session = kvtrim.compress(model, make_tokenizer(), sample_text(300), method=name, ratio=0.5)
    assert session.stats.layers_compressed == model.config.num_hidden_layers
    assert session.stats.kv_bytes_after < session.stats.kv_bytes_before
    assert isinstance(session.ask("alpha?", max_new_tokens=3), str)
