"""With nothing evicted, kvtrim's outputs must equal the model's own, on every architecture."""

from __future__ import annotations

import torch
from conftest import make_tokenizer, sample_text

import kvtrim
from kvtrim.cache import CacheSnapshot
from kvtrim.models.prompting import encode

QUESTION = "which word comes first?"


def _full_ids(session: kvtrim.Session, question: str) -> tuple[list[int], list[int]]:
    ctx = encode(session.tokenizer, session.layout.context_text, session.layout.add_special_tokens)
    q = encode(session.tokenizer, session.layout.question_text(question))
    return ctx, q


def _question_logits(session: kvtrim.Session, q_ids: list[int]) -> torch.Tensor:
    """Logits of the question tokens read from the session's cache (cache restored after)."""
    snap = CacheSnapshot.take(session.cache)
    pos = torch.arange(session.context_length, session.context_length + len(q_ids))[None]
    with torch.inference_mode():
        out = session.model(
            input_ids=torch.tensor([q_ids]), position_ids=pos, cache=session.cache, use_cache=True
        )
    snap.restore(session.cache)
    return out.logits[0]


def test_ratio_zero_logits_equal_model(model, tokenizer):
    for method, ratio in (("none", 0.5), ("knorm", 0.0), ("expected-attention", 0.0)):
        session = kvtrim.compress(model, tokenizer, sample_text(200), method=method, ratio=ratio)
        ctx, q = _full_ids(session, QUESTION)
        with torch.inference_mode():
            reference = model(input_ids=torch.tensor([ctx + q])).logits[0, len(ctx) :]
        torch.testing.assert_close(_question_logits(session, q), reference, atol=1e-4, rtol=1e-4)
        assert session.stats.kv_bytes_after == session.stats.kv_bytes_before


def test_ratio_zero_greedy_answer_equals_generate(model, tokenizer):
    session = kvtrim.compress(model, tokenizer, sample_text(200), method="none")
    ctx, q = _full_ids(session, QUESTION)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ctx + q]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=0,
        )
    expected = out[0, len(ctx) + len(q) :].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert session.answer(QUESTION, max_new_tokens=12).token_ids == expected


def test_questions_see_the_same_compressed_cache(model, tokenizer):
    session = kvtrim.compress(model, tokenizer, sample_text(300), method="knorm", ratio=0.5)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]
    first = session.answer(QUESTION, max_new_tokens=8).token_ids
    session.ask("something else entirely?", max_new_tokens=8)
    assert session.answer(QUESTION, max_new_tokens=8).token_ids == first
    for (k, v), layer in zip(before, session.cache.layers, strict=True):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_context_manager_ratio_zero_matches_generate(model, tokenizer):
    ids = torch.tensor([encode(tokenizer, sample_text(150))])
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        with kvtrim.compressing(model, "knorm", ratio=0.0):
            pressed = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, pressed)


def test_context_manager_keeps_true_positions(model, tokenizer):
    """generate() under compression must decode with the true RoPE positions, like a session does."""
    ids = encode(tokenizer, sample_text(150))
    with torch.inference_mode(), kvtrim.compressing(model, "knorm", ratio=0.5) as press:
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert press.stats.kv_bytes_after < press.stats.kv_bytes_before
    # Same computation by hand: compress the prompt, then decode at positions len(ids), len(ids)+1, ...
    from transformers import DynamicCache

    from kvtrim.generation import greedy_decode

    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), kvtrim.compressing(model, "knorm", ratio=0.5):
        logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits
    first = int(logits[0, -1].argmax())
    rest = greedy_decode(model, cache, [first], len(ids), 5, stop_ids=set())
    assert out[0, len(ids) :].tolist() == [first, *rest]


def test_plain_layout_without_chat_template(model):
    tok = make_tokenizer(chat_template=False)
    session = kvtrim.compress(model, tok, sample_text(120), method="none")
    assert session.layout.question_text("q?").startswith("Question: ")
    assert session.context_length == len(encode(tok, session.layout.context_text, add_special_tokens=True))
    assert session.ask("q?", max_new_tokens=3) is not None
