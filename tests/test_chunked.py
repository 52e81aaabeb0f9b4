"""Chunked prefill with eviction: bounded cache, exact final budget, true positions."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.core.ratios import n_keep
from kvtrim.scorers.simple import StreamingLLM


def test_chunked_without_eviction_equals_plain_prefill(model, tokenizer):
    context = sample_text(250)
    plain = kvtrim.compress(model, tokenizer, context, method="knorm", ratio=0.0)
    chunked = kvtrim.compress(
        model,
        tokenizer,
        context,
        method="knorm",
        budget="tokens",
        budget_options={"tokens": 10_000},
        chunk_size=64,
    )
    for a, b in zip(plain.cache.layers, chunked.cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)
    assert chunked.answer("q?", max_new_tokens=6).token_ids == plain.answer("q?", max_new_tokens=6).token_ids


class RecordingStreaming(StreamingLLM):
    """StreamingLLM that records the largest cache it was asked to score and the key positions."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.positions: list[torch.Tensor] = []

    def score(self, view):
        self.largest = max(self.largest, view.keys.shape[2])
        self.positions.append(view.key_positions)
        return super().score(view)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_cache_is_bounded_and_keeps_true_positions(arch, tokenizer):
    model = make_model(arch)
    scorer = RecordingStreaming()
    session = kvtrim.compress(model, tokenizer, sample_text(400), method=scorer, ratio=0.75, chunk_size=32)
    seq, keep = session.context_length, n_keep(session.context_length, 0.75)
    assert scorer.largest <= keep + 32  # never more than budget + one chunk
    for layer in session.cache.layers:
        assert layer.keys.shape[2] == keep
    # StreamingLLM keeps the sinks and the most recent positions, even across chunks
    last = scorer.positions[-1]  # (B, Hkv, T) of the last chunk, before its eviction
    kept = torch.sort(last[0, 0]).values
    assert kept[:4].tolist() == [0, 1, 2, 3]
    assert kept[-1].item() == seq - 1
    assert (
        session.stats.kv_tokens_after
        == keep * model.config.num_key_value_heads * model.config.num_hidden_layers
    )
    assert session.stats.kv_bytes_before > session.stats.kv_bytes_after
    assert isinstance(session.ask("q?", max_new_tokens=4), str)


def test_chunked_expected_attention_and_errors(tokenizer):
    model = make_model("llama")
    session = kvtrim.compress(
        model, tokenizer, sample_text(300), method="expected-attention", ratio=0.5, chunk_size=50
    )
    assert all(layer.keys.shape[2] == n_keep(session.context_length, 0.5) for layer in session.cache.layers)
    with pytest.raises(kvtrim.KVTrimError, match="does not support chunked"):
        kvtrim.compress(model, tokenizer, sample_text(100), method="snapkv", chunk_size=32)
    with pytest.raises(kvtrim.KVTrimError, match="uniform and tokens"):
        kvtrim.compress(model, tokenizer, sample_text(100), method="knorm", budget="adaptive", chunk_size=32)
    with pytest.raises(kvtrim.KVTrimError, match="chunk_size"):
        kvtrim.compress(model, tokenizer, sample_text(100), method="knorm", chunk_size=0)
