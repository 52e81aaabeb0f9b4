"""Batches of contexts with different lengths: each context ends up exactly as if run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.simple import KNorm

CONTEXTS = [sample_text(170, seed=1), sample_text(45, seed=2), sample_text(110, seed=3)]
QUESTIONS = ["Which word comes first?", "What?", "Name a river."]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def assert_same_as_alone(model, tokenizer, method, ratio, **kwargs):
    batch = kvtrim.compress(model, tokenizer, CONTEXTS, method, ratio, **kwargs)
    answers = batch.answer(QUESTIONS, max_new_tokens=10)
    for b, (context, question) in enumerate(zip(CONTEXTS, QUESTIONS, strict=True)):
        alone = kvtrim.compress(model, tokenizer, context, method, ratio, **kwargs)
        assert batch.context_lengths[b] == alone.context_length
        pad = batch.padding[b]
        for mine, theirs in zip(batch.cache.layers, alone.cache.layers, strict=True):
            # same kept pairs, in the same order, after this element's padding slots
            torch.testing.assert_close(mine.keys[b : b + 1, :, pad:], theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.values[b : b + 1, :, pad:], theirs.values, rtol=1e-4, atol=1e-5)
        assert answers[b].token_ids == alone.answer(question, max_new_tokens=10).token_ids
    return batch


# qwen3's k-norm makes every key norm equal in a random model: KNorm would rank float noise there.
@pytest.mark.parametrize(
    "arch,method",
    [
        ("llama", "knorm"),
        ("llama", "expected-attention"),
        ("llama", "snapkv"),
        ("llama", "qfilters"),
        ("mistral", "tova"),
        ("qwen2", "streaming-llm"),
        ("qwen3", "expected-attention"),
        ("phi3", "knorm"),
    ],
)
def test_batch_equals_one_by_one(arch, method, tokenizer):
    assert_same_as_alone(make_model(arch), tokenizer, method, 0.5)


def test_batch_with_token_budget_and_no_eviction(tokenizer):
    model = make_model("llama")
    batch = assert_same_as_alone(
        model, tokenizer, "knorm", 0.0, budget="tokens", budget_options={"tokens": 60}
    )
    lengths = batch.context_lengths
    kept = [min(60, n) for n in lengths]
    assert batch.padding == [max(kept) - k for k in kept]
    none = assert_same_as_alone(model, tokenizer, "none", 0.0)
    assert none.padding == [max(lengths) - n for n in lengths]


class ShapeRecorder(KNorm):
    """KNorm that notes the length of every view it is asked to score."""

    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []

    def score(self, view):
        self.lengths.append(view.keys.shape[2])
        assert view.keys.shape[0] == 1 and len(view.query_positions) == view.keys.shape[2]
        return super().score(view)


def test_padding_is_never_scored_nor_kept(tokenizer):
    model = make_model("llama")
    scorer = ShapeRecorder()
    batch = kvtrim.compress(model, tokenizer, CONTEXTS, scorer, 0.5)
    lengths = batch.context_lengths
    assert scorer.lengths == lengths * model.config.num_hidden_layers  # each context alone, per layer
    kept = [n - int(0.5 * n) for n in lengths]
    assert batch.padding == [max(kept) - k for k in kept]
    heads = model.config.num_key_value_heads * model.config.num_hidden_layers
    assert batch.stats.kv_tokens_before == sum(lengths) * heads
    assert batch.stats.kv_tokens_after == sum(kept) * heads


def test_batch_answers_can_repeat(tokenizer):
    model = make_model("llama")
    batch = kvtrim.compress(model, tokenizer, CONTEXTS, "knorm", 0.5)
    first = batch.ask(QUESTIONS, max_new_tokens=6)
    batch.ask(["x?", "y?", "z?"], max_new_tokens=3)
    assert batch.ask(QUESTIONS, max_new_tokens=6) == first


def test_batch_errors(tokenizer):
    llama = make_model("llama")
    with pytest.raises(KVTrimError, match="uniform and tokens budgets"):
        kvtrim.compress(llama, tokenizer, CONTEXTS, "knorm", 0.5, budget="adaptive")
    with pytest.raises(KVTrimError, match="sliding-window"):
        kvtrim.compress(make_model("gemma3"), tokenizer, CONTEXTS, "knorm", 0.5)
    with pytest.raises(KVTrimError, match="one question per context"):
        kvtrim.compress(llama, tokenizer, CONTEXTS, "knorm", 0.5).ask(["only one?"])
    with pytest.raises(KVTrimError, match="at least one context"):
        kvtrim.compress(llama, tokenizer, [], "knorm", 0.5)
    with pytest.raises(KVTrimError, match="chunked prefill, decoding eviction"):
        kvtrim.compress(llama, tokenizer, CONTEXTS, "knorm", 0.5, chunk_size=16)
    with pytest.raises(KVTrimError, match="empty"):
        kvtrim.compress(llama, tokenizer, ["fine", " "], "knorm", 0.5)


def test_shared_batch_prefill_equals_compressing_the_batch(tokenizer):
    """One batch prefill, every cell derived from it: bit-identical caches, same answers."""
    from kvtrim.strategies.shared_batch import prefill_batch_once

    model = make_model("llama")
    methods = ["knorm", "expected-attention", "snapkv"]
    prefill = prefill_batch_once(model, tokenizer, CONTEXTS, methods, [0.25, 0.5])
    for method in methods:
        for ratio in (0.25, 0.5):
            shared = prefill.session(method, ratio)
            alone = kvtrim.compress(model, tokenizer, CONTEXTS, method, ratio)
            assert shared.padding == alone.padding
            for mine, theirs in zip(shared.cache.layers, alone.cache.layers, strict=True):
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
            for name in ("kv_tokens_before", "kv_tokens_after", "kv_bytes_after"):
                assert getattr(shared.stats, name) == getattr(alone.stats, name)
            budgets = [5, 3, 8]  # one new-token budget per context
            answers = shared.answer(QUESTIONS, max_new_tokens=budgets)
            assert [a.token_ids for a in answers] == [a.token_ids for a in alone.answer(QUESTIONS, budgets)]
            assert all(len(a.token_ids) <= n for a, n in zip(answers, budgets, strict=True))
    with pytest.raises(KVTrimError, match="uniform and tokens budgets"):
        prefill_batch_once(model, tokenizer, CONTEXTS, methods, [0.5], budgets=["adaptive"])
