"""KVzip: scores against a slow reference that recomputes the reconstruction from scratch.

The reference runs one plain forward (no cache, no kvtrim hooks) over context + reconstruction
input for every chunk, captures each layer's post-RoPE queries and keys from inside the model's
own attention, builds the explicit causal attention matrix in float64 and takes, for every
context key, the max over the reconstruction queries, the GQA group and the chunks.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvtrim
from kvtrim.bench.config import BenchConfig
from kvtrim.bench.evaluate import CellEvaluator
from kvtrim.bench.samples import build_samples, uses_chat_template
from kvtrim.cache import cache_bytes
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep
from kvtrim.core.selection import top_indices
from kvtrim.models.prompting import encode, encode_context
from kvtrim.scorers import METHODS, make_scorer
from kvtrim.scorers.kvzip import KVzip
from kvtrim.strategies import reconstruction
from kvtrim.strategies.reconstruction import score_by_reconstruction
from kvtrim.strategies.shared_prefill import prefill_once

CAPTURE = "kvtrim_test_capture"
_captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    _captured[module.layer_idx] = (query.detach().clone(), key.detach().clone(), float(scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


pytestmark = pytest.mark.usefixtures("one_thread")


def slow_kvzip(
    model, context_ids: list[int], inputs: list[list[int]], n_sink: int
) -> dict[int, torch.Tensor]:
    """layer -> (Hkv, T) float64 scores, from explicit attention matrices of plain forwards."""
    seq = len(context_ids)
    heads = model.config.num_attention_heads
    model.set_attn_implementation(CAPTURE)
    best: dict[int, torch.Tensor] = {}
    try:
        for ids in inputs:
            _captured.clear()
            full = context_ids + ids
            with torch.no_grad():
                model(
                    input_ids=torch.tensor([full]),
                    position_ids=torch.arange(len(full))[None],
                    use_cache=False,
                )
            for layer, (query, key, scaling) in _captured.items():
                if (
                    getattr(model.config, "layer_types", None)
                    and model.config.layer_types[layer] != "full_attention"
                ):
                    continue
                q, k = query[0].double(), key[0].double()  # (H, L, D), (Hkv, L, D)
                group = heads // k.shape[0]
                length = q.shape[1]
                future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
                scores = torch.zeros(k.shape[0], seq, dtype=torch.float64)
                for h in range(heads):
                    logits = scaling * q[h] @ k[h // group].T  # (L, L)
                    attn = torch.softmax(logits.masked_fill(future, -math.inf), dim=-1)
                    rows = attn[seq:, :seq]  # reconstruction queries -> context keys
                    scores[h // group] = torch.maximum(scores[h // group], rows.max(dim=0).values)
                best[layer] = scores if layer not in best else torch.maximum(best[layer], scores)
    finally:
        model.set_attn_implementation("sdpa")
    for scores in best.values():
        scores[:, :n_sink] = math.inf
    return best


def prefilled(model, tok, context: str):
    """An uncompressed cache of ``context`` and its layout, as kvtrim.compress builds it."""
    session = kvtrim.compress(model, tok, context, method="none", ratio=0.0)
    layout, ids = encode_context(model, tok, context, None)
    return session.cache, layout, ids


SMALL_BLOCKS = {"chunk_tokens": 40, "overlap": 3, "block_size": 7, "key_block": 5, "n_sink": 2}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("options", [{}, SMALL_BLOCKS])
@pytest.mark.parametrize("with_lse", [True, False])
def test_scores_match_explicit_reconstruction_attention(arch, options, with_lse, monkeypatch):
    """With the model's log-sum-exp (the default) the softmax is never recomputed: ``score`` is
    then made to fail; without it (``score_reconstruction`` gets None) the scorer recomputes it."""
    if with_lse:
        monkeypatch.setattr(KVzip, "score", lambda self, view: pytest.fail("softmax recomputed"))
    else:
        monkeypatch.setattr(reconstruction, "keeping_log_sum_exp", lambda: contextlib.nullcontext({}))
    model, tok = make_model(arch), make_tokenizer()
    context = sample_text(100, seed=3)
    scorer = KVzip(**options)
    cache, layout, ids = prefilled(model, tok, context)
    inputs = scorer.reconstruction_inputs(tok, layout, context, 10**6)
    assert len(inputs) == (1 if not options else 3)
    got, _ = score_by_reconstruction(model, tok, cache, scorer, layout, context, len(ids))
    expected = slow_kvzip(model, ids, inputs, scorer.n_sink)
    assert sorted(got) == sorted(expected)
    for layer, scores in expected.items():
        g = got[layer][0].double()
        assert torch.equal(torch.isinf(g), torch.isinf(scores))
        finite = torch.isfinite(scores)
        torch.testing.assert_close(g[finite], scores[finite], rtol=1e-3, atol=1e-6)


def test_reconstruction_inputs_cover_the_context_in_chunks():
    tok = make_tokenizer()
    model = make_model("llama")
    context = sample_text(100)
    layout, _ = encode_context(model, tok, context, None)
    scorer = KVzip(chunk_tokens=30, overlap=4)
    inputs = scorer.reconstruction_inputs(tok, layout, context, 10**6)
    first = encode(tok, scorer.prompt) + encode(tok, layout.question_suffix)
    assert inputs[0][: len(first)] == first
    later = encode(tok, scorer.continue_prompt)
    context_ids = encode(tok, context)
    chunks = [context_ids[i : i + 30] for i in range(0, len(context_ids), 30)]
    assert len(inputs) == len(chunks) == 4
    for i, (ids, chunk) in enumerate(zip(inputs, chunks, strict=True)):
        assert ids[-len(chunk) :] == chunk
        if i:
            assert ids[: len(later) + 4] == later + chunks[i - 1][-4:]
    # chunks shrink to fit the room left in the window; no room at all is a user error
    overhead = len(later) + 4 + len(encode(tok, layout.question_suffix))  # the longest prompt part
    small = scorer.reconstruction_inputs(tok, layout, context, overhead + 10)
    assert len(small) == math.ceil(len(context_ids) / 10)
    assert all(len(ids) <= overhead + 10 for ids in small)
    with pytest.raises(KVTrimError, match="room"):
        scorer.reconstruction_inputs(tok, layout, context, 5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compress_keeps_the_top_scores_and_drops_reconstruction_tokens(arch):
    model, tok = make_model(arch), make_tokenizer()
    context = sample_text(150, seed=1)
    scorer = KVzip(chunk_tokens=50)
    full, layout, ids = prefilled(model, tok, context)
    scores, _ = score_by_reconstruction(model, tok, full, scorer, layout, context, len(ids))
    session = kvtrim.compress(model, tok, context, method="kvzip", ratio=0.6, chunk_tokens=50)
    keep = n_keep(len(ids), 0.6)
    for idx, (layer, reference) in enumerate(zip(session.cache.layers, full.layers, strict=True)):
        if idx not in scores:  # a sliding layer: compacted, not evicted
            assert torch.equal(layer.keys, reference.keys)
            continue
        chosen = top_indices(scores[idx], keep)  # (B, Hkv, K)
        expected = torch.gather(
            reference.keys, 2, chosen[..., None].expand(-1, -1, -1, reference.keys.shape[-1])
        )
        assert torch.equal(layer.keys, expected)  # only context pairs, no reconstruction token
    stats = session.stats
    assert stats.layers_compressed == len(session.cache.layers) - sum(
        bool(getattr(layer, "is_sliding", False)) for layer in session.cache.layers
    )
    assert stats.kv_bytes_after == cache_bytes(session.cache)
    assert stats.kv_bytes_peak > stats.kv_bytes_before  # full context + one reconstruction chunk
    assert stats.compress_s > 0


def test_ratio_zero_leaves_the_prefilled_cache_and_answers_like_no_eviction():
    model, tok = make_model("llama"), make_tokenizer()
    context = sample_text(120, seed=2)
    plain = kvtrim.compress(model, tok, context, method="none", ratio=0.0)
    zipped = kvtrim.compress(model, tok, context, method="kvzip", ratio=0.0, chunk_tokens=40)
    for a, b in zip(plain.cache.layers, zipped.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert zipped.ask("Which words?", max_new_tokens=8) == plain.ask("Which words?", max_new_tokens=8)


def test_decoding_after_compression_and_other_budgets():
    model, tok = make_model("qwen3"), make_tokenizer()
    context = sample_text(160, seed=4)
    session = kvtrim.compress(model, tok, context, method="kvzip", ratio=0.5, budget="adaptive")
    first = session.ask("Repeat it.", max_new_tokens=6)
    assert session.ask("Repeat it.", max_new_tokens=6) == first  # the cache is restored after a question
    assert session.stats.kv_bytes_after < session.stats.kv_bytes_before


def test_kvzip_is_registered_and_refuses_what_it_cannot_do():
    assert METHODS["kvzip"] is KVzip and KVzip.paper == "arXiv 2505.23416"
    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(KVTrimError, match="chunked prefill"):
        kvtrim.compress(model, tok, sample_text(80), method="kvzip", ratio=0.5, chunk_size=32)
    with pytest.raises(KVTrimError, match="kvtrim.compress"), kvtrim.compressing(model, "kvzip", 0.5):
        pass
    with pytest.raises(KVTrimError, match="chunk_tokens"):
        make_scorer("kvzip", chunk_tokens=0)
    with pytest.raises(KVTrimError, match="key_block"):
        make_scorer("kvzip", key_block=0)


def test_shared_prefill_gives_the_same_caches_as_compressing_alone():
    model, tok = make_model("gemma3"), make_tokenizer()
    context = sample_text(160, seed=7)
    prefill = prefill_once(
        model, tok, context, {"knorm": make_scorer("knorm"), "kvzip": KVzip(chunk_tokens=60)}, [0.3, 0.7]
    )
    for ratio in (0.3, 0.7):
        shared = prefill.session("kvzip", ratio)
        alone = kvtrim.compress(model, tok, context, method="kvzip", ratio=ratio, chunk_tokens=60)
        for a, b in zip(shared.cache.layers, alone.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert shared.stats.kv_bytes_after == alone.stats.kv_bytes_after
        assert shared.stats.kv_tokens_after == alone.stats.kv_tokens_after
        assert shared.ask("Words?", max_new_tokens=5) == alone.ask("Words?", max_new_tokens=5)
    assert prefill.score_s["kvzip"] > 0
    assert (
        prefill.session("knorm", 0.3).cache.layers[1].keys.shape
        == prefill.session("kvzip", 0.3).cache.layers[1].keys.shape
    )


def test_bench_runner_shares_the_prefill_with_kvzip():
    model, tok = make_model("llama", max_positions=2048), make_tokenizer()
    config = BenchConfig(
        tasks=["passkey"], methods=["knorm", "kvzip"], ratios=[0.5], length=300, samples=1, max_new_tokens=4
    )
    evaluator = CellEvaluator(model, tok, config)
    sample = build_samples(config, tok)["passkey"][0]
    cells = [("knorm", 0.5, "uniform"), ("kvzip", 0.5, "uniform")]
    rows = {row["method"]: row for row in evaluator.run("passkey", 0, sample, cells)}
    assert rows["kvzip"]["shared_prefill"]
    chat = uses_chat_template(tok, config, "passkey")
    alone = kvtrim.compress(model, tok, sample.context, method="kvzip", ratio=0.5, use_chat_template=chat)
    assert rows["kvzip"]["kv_bytes_after"] == alone.stats.kv_bytes_after
    assert rows["kvzip"]["kv_tokens_after"] == alone.stats.kv_tokens_after
    prefix = sample.answer_prefix if config.answer_prefix else ""
    prefix = prefix.lstrip() if chat else prefix
    answer = alone.answer(sample.question, max_new_tokens=4, answer_prefix=prefix)
    assert rows["kvzip"]["prediction"] == answer.text


def test_shared_prefill_applies_any_budget_to_kvzip_scores():
    from kvtrim.cache import layer_bytes

    model, tok = make_model("llama"), make_tokenizer()
    context = sample_text(160, seed=8)
    scorer = KVzip(chunk_tokens=60)
    prefill = prefill_once(model, tok, context, {"kvzip": scorer}, [0.5], budgets=["adaptive", "pyramid"])
    for budget in ("adaptive", "pyramid"):
        shared = prefill.session("kvzip", 0.5, budget)
        alone = kvtrim.compress(
            model, tok, context, method="kvzip", ratio=0.5, budget=budget, chunk_tokens=60
        )
        assert [layer_bytes(a) for a in shared.cache.layers] == [layer_bytes(b) for b in alone.cache.layers]
        assert shared.stats.kv_tokens_after == alone.stats.kv_tokens_after
        assert shared.ask("Words?", max_new_tokens=5) == alone.ask("Words?", max_new_tokens=5)
