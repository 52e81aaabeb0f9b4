"""SimLayerKV's lazy-layer budget and entropy-gated ChunkKV against slow references written from
their definitions (float64, explicit loops), on views of tiny real models."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import close, make_model, make_tokenizer, sample_text
from test_methods import capture_views

import kvtrim
from kvtrim.budgets import make_budget
from kvtrim.budgets.simlayer import edge_attention_mass
from kvtrim.core.errors import KVTrimError
from kvtrim.core.selection import top_indices
from kvtrim.scorers import make_scorer
from kvtrim.scorers.base import LayerView
from kvtrim.scorers.snapkv import snapkv_scores

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

views_of = functools.cache(capture_views)


def last_view(arch: str = "llama", n_chars: int = 150) -> LayerView:
    return views_of(arch, n_chars)[1][-1]


# ---------------------------------------------------------------- SimLayerKV


def slow_edge_mass(view: LayerView, n_last: int, n_initial: int, n_recent: int) -> float:
    """Mean over query heads and the last n_last queries of their softmax mass on the edge keys."""
    queries = view.queries(rotated=True)[0].double()  # (H, T, D)
    keys = view.keys[0].double()  # (Hkv, T, D)
    seq = keys.shape[1]
    total = 0.0
    for h in range(view.n_heads):
        for t in range(seq - n_last, seq):
            logits = torch.stack([queries[h, t] @ keys[h // view.group_size, s] for s in range(t + 1)])
            weights = torch.softmax(logits * view.scaling, dim=0)
            total += sum(float(weights[s]) for s in range(t + 1) if s < n_initial or s >= seq - n_recent)
    return total / (view.n_heads * n_last)


@pytest.mark.parametrize("n_last,n_initial,n_recent", [(1, 4, 8), (3, 2, 16), (5, 0, 1)])
def test_edge_attention_mass_matches_the_slow_reference(n_last, n_initial, n_recent):
    view = last_view("qwen3", 120)
    got = edge_attention_mass(view, n_last, n_initial, n_recent)  # (1,)
    assert got.shape == (1,)
    assert math.isclose(float(got[0]), slow_edge_mass(view, n_last, n_initial, n_recent), rel_tol=1e-4)


def test_lazy_layers_keep_sinks_and_recent_the_others_everything():
    view = last_view("llama", 150)
    seq = view.keys.shape[2]
    scores = make_scorer("streaming-llm").score(view)  # sinks, then recency
    mass = float(edge_attention_mass(view, 1, 4, 8)[0])
    lazy = make_budget(f"simlayer:n_recent=8:lazy_threshold={mass - 1e-3}")
    kept = lazy.select_seen(scores, view, 2, 3, 0.0)  # (1, Hkv, 12)
    expected = torch.cat([torch.arange(4), torch.arange(seq - 8, seq)])
    assert torch.equal(kept[0, 0], expected) and bool(lazy.lazy[2][0])
    busy = make_budget(f"simlayer:n_recent=8:lazy_threshold={mass + 1e-3}")
    assert torch.equal(busy.select_seen(scores, view, 2, 3, 0.0)[0, 0], torch.arange(seq))
    assert not bool(busy.lazy[2][0])


def test_a_lazy_layer_keeps_the_scorers_best_with_another_scorer():
    view = last_view("llama", 150)
    scores = make_scorer("knorm").score(view)
    kept = make_budget("simlayer:n_recent=6:n_initial=2:lazy_threshold=0").select_seen(
        scores, view, 0, 3, 0.0
    )
    assert torch.equal(kept, top_indices(scores, 8))


def test_simlayer_compresses_only_the_lazy_layers():
    model, tok = make_model("llama"), make_tokenizer()
    session = kvtrim.compress(
        model, tok, sample_text(300), spec="streaming-llm+simlayer:n_recent=16:lazy_threshold=0"
    )
    assert [layer.keys.shape[2] for layer in session.cache.layers] == [20] * len(session.cache.layers)
    session = kvtrim.compress(
        model, tok, sample_text(300), spec="streaming-llm+simlayer:n_recent=16:lazy_threshold=1"
    )
    assert session.stats.kv_tokens_after == session.stats.kv_tokens_before
    assert isinstance(session.ask("Which word?", max_new_tokens=3), str)


def test_simlayer_is_checked_and_refused_where_it_cannot_work():
    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(KVTrimError, match="lazy_threshold"):
        make_budget("simlayer:lazy_threshold=1.5")
    with pytest.raises(KVTrimError, match="n_last"):
        make_budget("simlayer:n_last=0")
    with pytest.raises(KVTrimError, match="reconstruction"):
        kvtrim.compress(model, tok, sample_text(200), spec="kvzip+simlayer")
    with pytest.raises(KVTrimError, match="Chunked prefill works with"):
        kvtrim.compress(model, tok, sample_text(200), spec="streaming-llm+simlayer/chunk=32")


# ---------------------------------------------------------------- entropy-gated ChunkKV


def slow_gated_chunkkv(view: LayerView, chunk: int, gate: float, share: float) -> torch.Tensor:
    """(T,) the gated ChunkKV score of every position, chunk by chunk with explicit loops."""
    base = snapkv_scores(view, 64, 5)[0].double().sum(0)  # (T,), window +inf
    seq = base.shape[0]
    floor = float(base[torch.isfinite(base)].max()) + 1.0
    out = torch.empty(seq, dtype=torch.float64)
    for start in range(0, seq, chunk):
        part = base[start : start + chunk]
        n = part.shape[0]
        mean = float(part.mean())
        if math.isinf(mean):
            out[start : start + chunk] = math.inf
            continue
        p = part / part.sum()
        entropy = -sum(float(x) * math.log(float(x)) for x in p if x > 0) / math.log(n) if n > 1 else 1.0
        peaks = set(torch.argsort(part, descending=True)[: max(1, math.ceil(share * n))].tolist())
        for i in range(n):
            gated_out = entropy < gate and i not in peaks
            out[start + i] = float(part[i]) - floor if gated_out else mean
    return out


@pytest.mark.parametrize("chunk,gate,share", [(8, 0.9, 0.25), (5, 0.97, 0.5), (20, 0.5, 0.1)])
def test_entropy_gated_chunkkv_matches_the_slow_reference(chunk, gate, share):
    view = last_view("llama", 300)
    scorer = make_scorer(f"chunkkv-entropy:chunk_size={chunk}:entropy_gate={gate}:peak_share={share}")
    got = scorer.score(view)  # (1, Hkv, T)
    assert torch.equal(got[0, 0], got[0, -1])  # all heads share one ranking
    expected = slow_gated_chunkkv(view, chunk, gate, share)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got[0, 0]), finite)
    close(got[0, 0][finite].double(), expected[finite], rtol=1e-4, atol=1e-6)


def test_entropy_gate_zero_is_plain_chunkkv_and_a_gated_chunk_frees_budget():
    view = last_view("llama", 300)
    plain = make_scorer("chunkkv:chunk_size=8:window=8").score(view)
    assert torch.equal(make_scorer("chunkkv-entropy:chunk_size=8:window=8:entropy_gate=0").score(view), plain)
    gated = make_scorer("chunkkv-entropy:chunk_size=8:window=8:entropy_gate=1").score(view)  # all gated
    keep = 8 + 24  # the window's chunk (or two) and a few more
    kept_plain, kept_gated = top_indices(plain, keep)[0, 0], top_indices(gated, keep)[0, 0]
    chunks = lambda kept: {int(i) // 8 for i in kept}  # noqa: E731
    assert len(chunks(kept_gated)) > len(chunks(kept_plain))  # the freed budget reaches more chunks


def test_entropy_gated_chunkkv_options_are_checked():
    with pytest.raises(KVTrimError, match="entropy_gate"):
        make_scorer("chunkkv-entropy:entropy_gate=2")
    with pytest.raises(KVTrimError, match="peak_share"):
        make_scorer("chunkkv-entropy:peak_share=0")
