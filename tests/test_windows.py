"""Sliding-window layers compressed within their window (``/windows``): with nothing evicted the
model's own output; with eviction each head keeps the scorer's best share of its window, pairs
still slide out of it by position, and the whole cache shrinks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.attention.standins import WindowKV
from kvtrim.attention.window import window_attention
from kvtrim.cache.layers import is_sliding
from kvtrim.cache.window import WindowLayer
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec
from kvtrim.models.forward import forward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gemma():
    return make_model("gemma3")  # layers: sliding (window 8), full, sliding, full


def _logits_along(model, session, ids: list[int], steps: int) -> list[torch.Tensor]:
    """The last position's logits after ``ids``, then after each of ``steps`` greedy tokens."""
    cache, start = copy.deepcopy(session.cache), session.context_length
    positions = torch.arange(start, start + len(ids))[None]
    out = [forward(model, [ids], positions, cache).logits[0, -1]]
    for step in range(steps):
        token = int(out[-1].argmax())
        out.append(forward(model, [[token]], torch.tensor([[start + len(ids) + step]]), cache).logits[0, -1])
    return out


def test_with_nothing_evicted_windows_answer_exactly_as_the_model(gemma, tokenizer):
    context = sample_text(240)
    plain = kvtrim.compress(gemma, tokenizer, context, method="none", ratio=0.0)
    windows = kvtrim.compress(gemma, tokenizer, context, spec="knorm@0/windows")
    assert [type(layer) is WindowLayer for layer in windows.cache.layers] == [True, False, True, False]
    ids = tokenizer("which tower is north?", add_special_tokens=False)["input_ids"]
    # 20 decoded tokens outrun the window of 8: pairs leave it while answering
    for want, got in zip(
        _logits_along(gemma, plain, ids, 20), _logits_along(gemma, windows, ids, 20), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert windows.ask("which tower?", max_new_tokens=12) == plain.ask("which tower?", max_new_tokens=12)


def test_each_head_keeps_the_scorers_best_share_of_its_window(gemma, tokenizer):
    context = sample_text(240)
    plain = kvtrim.compress(gemma, tokenizer, context, method="none", ratio=0.0)
    session = kvtrim.compress(gemma, tokenizer, context, spec="knorm@0.5/windows")
    n = session.context_length
    for whole, layer in zip(plain.cache.layers, session.cache.layers, strict=True):
        if not is_sliding(whole):
            continue
        window = whole.keys  # (1, Hkv, W − 1, D) the last W − 1 tokens
        seq = window.shape[2]
        norms = window.float().norm(dim=-1)  # (1, Hkv, W − 1) KNorm keeps the smallest
        want = norms.topk(seq - seq // 2, dim=-1, largest=False).indices.sort(dim=-1).values + (n - seq)
        assert torch.equal(layer.positions, want)
        assert torch.equal(
            layer.keys, torch.gather(window, 2, want[..., None].expand_as(layer.keys) - (n - seq))
        )
    without = kvtrim.compress(gemma, tokenizer, context, spec="knorm@0.5")
    assert session.stats.kv_bytes_after < without.stats.kv_bytes_after
    assert session.stats.kv_bytes_sliding == sum(
        layer.nbytes() for layer in session.cache.layers if isinstance(layer, WindowLayer)
    )
    assert "/windows" in str(session.spec)


def test_pairs_leave_the_window_by_position_and_only_the_visible_ones_are_held():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    positions = torch.tensor([[[10, 12, 14, 15], [11, 13, 14, 15]]])  # kept of a window ending at 15
    layer = WindowLayer(keys, values, positions, window=6, seen=16)
    for step in range(5):
        layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        nxt = 17 + step  # the next query's position
        assert bool((layer.positions > nxt - 1 - 6).any(dim=1).all())  # no slot hidden in every head
        # every pair a later query can still see is held
        for h, kept in enumerate([[10, 12, 14, 15], [11, 13, 14, 15]]):
            visible = {p for p in [*kept, *range(16, nxt)] if p > nxt - 6}
            assert visible <= set(layer.positions[0, h].tolist())
    assert layer.held_tokens() == layer.keys.shape[2] <= 6


@pytest.mark.parametrize("n_heads", [2, 4])
def test_window_attention_matches_a_loop_over_the_visible_pairs(n_heads):
    torch.manual_seed(1)
    n_kv, q_len, dim, window = 2, 3, 8, 5
    positions = torch.tensor([[[3, 6, 7, 9, 10, 11], [4, 5, 8, 9, 10, 11]]])  # last 3: the new tokens
    keys, values = torch.randn(1, n_kv, 6, dim), torch.randn(1, n_kv, 6, dim)
    query = torch.randn(1, n_heads, q_len, dim)
    standin = WindowKV(keys, values, positions, window)
    got = window_attention(None, query, standin, standin, None, scaling=0.3)  # (1, q, H, D)
    group = n_heads // n_kv
    for h in range(n_heads):
        kv = h // group
        for i, t in enumerate([9, 10, 11]):
            seen = [j for j, p in enumerate(positions[0, kv].tolist()) if t - window < p <= t]
            weights = torch.softmax(query[0, h, i] @ keys[0, kv, seen].T * 0.3, dim=-1)
            torch.testing.assert_close(got[0, i, h], weights @ values[0, kv, seen])


def test_the_spec_axis_round_trips_and_refuses_what_it_cannot_combine_with(gemma, tokenizer):
    spec = CompressionSpec.parse("tova@0.5+adaptive/windows")
    assert spec.windows and CompressionSpec.parse(str(spec)) == spec
    assert CompressionSpec.from_dict(spec.to_dict()) == spec
    for text in ("knorm@0.5/windows/chunk=64", "kvzip@0.5/windows", "knorm@0.5/windows/decode-budget=64"):
        with pytest.raises(KVTrimError, match="windows"):
            kvtrim.compress(gemma, tokenizer, sample_text(100), spec=text)
    with pytest.raises(KVTrimError, match="compressed windows"):
        kvtrim.compress(gemma, tokenizer, [sample_text(100), sample_text(90)], spec="knorm@0.5/windows")


def test_a_model_without_windows_is_unchanged_by_the_axis(llama, tokenizer):
    context = sample_text(200)
    a = kvtrim.compress(llama, tokenizer, context, spec="knorm@0.5")
    b = kvtrim.compress(llama, tokenizer, context, spec="knorm@0.5/windows")
    assert a.stats.kv_bytes_after == b.stats.kv_bytes_after
    assert a.ask("which?", max_new_tokens=8) == b.ask("which?", max_new_tokens=8)


def test_a_bench_with_windows_compresses_every_cell_alone_and_says_so(gemma, tokenizer, tmp_path):
    from kvtrim.bench.config import BenchConfig
    from kvtrim.bench.results import read_results
    from kvtrim.bench.run import run_bench

    options = dict(
        tasks=["passkey"], methods=["knorm"], ratios=[0.0, 0.5], length=400, samples=1, max_new_tokens=4
    )
    run_bench(gemma, tokenizer, BenchConfig(**options), tmp_path / "whole", progress=False)
    run_bench(gemma, tokenizer, BenchConfig(**options, windows=True), tmp_path / "windows", progress=False)
    whole, windows = (
        {row["ratio"]: row for row in read_results(tmp_path / name / "results.jsonl")}
        for name in ("whole", "windows")
    )
    assert windows[0.5]["spec"] == "knorm@0.5/windows" and not windows[0.5]["shared_prefill"]
    assert windows[0.5]["kv_bytes_after"] < whole[0.5]["kv_bytes_after"]
    assert windows[0.0]["prediction"] == whole[0.0]["prediction"]
    with pytest.raises(KVTrimError, match="windows"):
        BenchConfig(**{**options, "methods": ["kvzip"]}, windows=True)
