"""One prefill, every (method, ratio, budget) cell: bit-identical to compressing each cell alone."""

from __future__ import annotations

import pytest
import torch
from conftest import sample_text

import kvtrim
from kvtrim.cache.ragged import RaggedLayer
from kvtrim.strategies.shared_prefill import prefill_once

METHODS = ["knorm", "expected-attention", "snapkv", "streaming-llm", "none"]
RATIOS = [0.0, 0.5, 0.75]


def assert_same_cache(alone, cell) -> None:
    """Same layer types and bit-identical tensors, head by head for ragged layers."""
    for a, b in zip(alone.cache.layers, cell.cache.layers, strict=True):
        assert type(a) is type(b)
        if isinstance(a, RaggedLayer):
            assert a.head_lengths() == b.head_lengths()
            for ka, kb, va, vb in zip(a.head_keys, b.head_keys, a.head_values, b.head_values, strict=True):
                assert torch.equal(ka, kb) and torch.equal(va, vb)
        else:
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def assert_same_session(alone, cell) -> None:
    assert_same_cache(alone, cell)
    assert cell.stats.kv_bytes_after == alone.stats.kv_bytes_after
    assert cell.stats.kv_bytes_before == alone.stats.kv_bytes_before
    assert cell.stats.kv_tokens_before == alone.stats.kv_tokens_before
    assert cell.stats.kv_tokens_after == alone.stats.kv_tokens_after
    assert cell.stats.per_layer_kept == alone.stats.per_layer_kept
    assert cell.stats.layers_compressed == alone.stats.layers_compressed
    assert (cell.method, cell.ratio, cell.budget) == (alone.method, alone.ratio, alone.budget)
    assert cell.answer("q?", max_new_tokens=5).token_ids == alone.answer("q?", max_new_tokens=5).token_ids


def test_shared_prefill_cells_equal_single_runs(model, tokenizer):
    context = sample_text(240)
    shared = prefill_once(model, tokenizer, context, METHODS, RATIOS)
    assert len(shared.cells()) == len(METHODS) * len(RATIOS)
    for method in METHODS:
        for ratio in RATIOS:
            alone = kvtrim.compress(model, tokenizer, context, method=method, ratio=ratio)
            assert_same_session(alone, shared.session(method, ratio))


@pytest.mark.parametrize("budget", ["pyramid", "adaptive", "kvcompose"])
def test_shared_prefill_cells_equal_single_runs_for_each_budget(model, tokenizer, budget):
    """Per-layer (pyramid), ragged per-head (adaptive) and all-layers-at-once (kvcompose) budgets,
    from the same recorded scores."""
    context = sample_text(240)
    methods = ["knorm", "snapkv", "none"]
    shared = prefill_once(model, tokenizer, context, methods, [0.0, 0.5], budgets=["uniform", budget])
    assert model.config._attn_implementation == "kvtrim_sdpa"  # ragged.enable, as Compressor does
    assert len(shared.cells()) == 3 * 2 * 2
    n_ragged = 0
    for method in methods:
        for ratio in (0.0, 0.5):
            for name in ("uniform", budget):
                alone = kvtrim.compress(model, tokenizer, context, method=method, ratio=ratio, budget=name)
                cell = shared.session(method, ratio, name)
                assert_same_session(alone, cell)
                n_ragged += sum(isinstance(layer, RaggedLayer) for layer in cell.cache.layers)
    pyramid = shared.session("knorm", 0.5, "pyramid") if budget == "pyramid" else None
    if budget == "kvcompose":  # the layers split the uniform total between them
        composed, uniform = shared.session("snapkv", 0.5, budget), shared.session("snapkv", 0.5)
        assert len(set(composed.stats.per_layer_kept)) > 1
        assert sum(composed.stats.per_layer_kept) == sum(uniform.stats.per_layer_kept)
    elif pyramid is not None:  # lower layers keep more than upper ones
        layers = pyramid.cache.layers
        kept = [
            k for layer, k in zip(layers, pyramid.stats.per_layer_kept, strict=True) if not layer.is_sliding
        ]
        assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    else:
        assert n_ragged > 0  # the test reaches the ragged path


def test_cells_do_not_disturb_each_other(tokenizer):
    from conftest import make_model

    model = make_model("llama")
    shared = prefill_once(
        model, tokenizer, sample_text(200), ["knorm"], [0.5], budgets=["uniform", "adaptive"]
    )
    full_before = [layer.keys.clone() for layer in shared.full_cache.layers]
    first = shared.session("knorm", 0.5).answer("q?", max_new_tokens=6).token_ids
    shared.session("knorm", 0.5, "adaptive").answer("q?", max_new_tokens=6)
    assert shared.session("knorm", 0.5).answer("q?", max_new_tokens=6).token_ids == first
    for k, layer in zip(full_before, shared.full_cache.layers, strict=True):
        assert torch.equal(k, layer.keys)
    with pytest.raises(kvtrim.KVTrimError, match="No cell"):
        shared.session("knorm", 0.25)
    with pytest.raises(kvtrim.KVTrimError, match="No cell"):
        shared.session("knorm", 0.5, "pyramid")
    with pytest.raises(kvtrim.KVTrimError, match="Unknown budget"):
        prefill_once(model, tokenizer, "some text", ["knorm"], [0.5], budgets=["nope"])
    with pytest.raises(kvtrim.KVTrimError, match="needs the question"):
        prefill_once(model, tokenizer, "some text", ["snapkv-query-aware"], [0.5])
