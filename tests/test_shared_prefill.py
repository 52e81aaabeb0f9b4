"""One prefill, every (method, ratio) cell: bit-identical to compressing each cell alone."""

from __future__ import annotations

import pytest
import torch
from conftest import sample_text

import kvtrim
from kvtrim.shared_prefill import prefill_once

METHODS = ["knorm", "expected-attention", "snapkv", "streaming-llm", "none"]
RATIOS = [0.0, 0.5, 0.75]


def test_shared_prefill_cells_equal_single_runs(model, tokenizer):
    context = sample_text(240)
    shared = prefill_once(model, tokenizer, context, METHODS, RATIOS)
    assert len(shared.cells()) == len(METHODS) * len(RATIOS)
    for method in METHODS:
        for ratio in RATIOS:
            alone = kvtrim.compress(model, tokenizer, context, method=method, ratio=ratio)
            cell = shared.session(method, ratio)
            for a, b in zip(alone.cache.layers, cell.cache.layers, strict=True):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert cell.stats.kv_bytes_after == alone.stats.kv_bytes_after
            assert cell.stats.kv_bytes_before == alone.stats.kv_bytes_before
            assert cell.stats.kv_tokens_after == alone.stats.kv_tokens_after
            assert (
                cell.answer("q?", max_new_tokens=5).token_ids
                == alone.answer("q?", max_new_tokens=5).token_ids
            )


def test_cells_do_not_disturb_each_other(tokenizer):
    from conftest import make_model

    model = make_model("llama")
    shared = prefill_once(model, tokenizer, sample_text(200), ["knorm"], [0.5])
    full_before = [layer.keys.clone() for layer in shared.full_cache.layers]
    first = shared.session("knorm", 0.5).answer("q?", max_new_tokens=6).token_ids
    assert shared.session("knorm", 0.5).answer("q?", max_new_tokens=6).token_ids == first
    for k, layer in zip(full_before, shared.full_cache.layers, strict=True):
        assert torch.equal(k, layer.keys)
    with pytest.raises(kvtrim.KVTrimError, match="No cell"):
        shared.session("knorm", 0.25)
