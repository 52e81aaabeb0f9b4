"""Kept counts and byte figures are exact and come from the real tensor storage."""

from __future__ import annotations

import math

import pytest
from conftest import sample_text

import kvtrim
from kvtrim.cache import cache_bytes
from kvtrim.core.ratios import n_keep


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_kept_counts_and_bytes_are_exact(model, tokenizer, ratio):
    session = kvtrim.compress(model, tokenizer, sample_text(257), method="knorm", ratio=ratio)
    seq = session.context_length
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pair_bytes = 2 * cfg.num_key_value_heads * head_dim * 4  # K and V, float32, batch 1
    expected_keep = seq - math.floor(ratio * seq + 1e-9)
    expected_before = expected_after = expected_sliding = 0
    for layer in session.cache.layers:
        held = layer.keys.shape[-2]
        if getattr(layer, "is_sliding", False):
            assert held == min(seq, layer.sliding_window - 1)  # sliding layers are left as they are
            expected_before += held * pair_bytes
            expected_after += held * pair_bytes
            expected_sliding += held * pair_bytes
        else:
            assert held == expected_keep
            expected_before += seq * pair_bytes
            expected_after += expected_keep * pair_bytes
        # Real memory: the storage behind each tensor holds only the kept pairs.
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4
    assert session.stats.kv_bytes_before == expected_before
    assert session.stats.kv_bytes_after == expected_after == cache_bytes(session.cache)
    assert session.stats.kv_bytes_sliding == expected_sliding  # reported apart: windows stay whole


def test_n_keep_rounding():
    assert n_keep(10, 0.25) == 8  # floor(2.5) = 2 evicted, keep rounds up
    assert n_keep(10, 0.3) == 7
    assert n_keep(1, 0.9) == 1
    assert n_keep(2048, 0.5) == 1024
    assert all(n_keep(t, 0.99) >= 1 for t in range(1, 200))


def test_token_counts_in_stats(tokenizer):
    from conftest import make_model

    model = make_model("llama")
    session = kvtrim.compress(model, tokenizer, sample_text(100), method="knorm", ratio=0.5)
    seq, heads, layers = (
        session.context_length,
        model.config.num_key_value_heads,
        model.config.num_hidden_layers,
    )
    assert session.stats.kv_tokens_before == seq * heads * layers
    assert session.stats.kv_tokens_after == n_keep(seq, 0.5) * heads * layers
