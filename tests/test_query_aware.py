"""Query-aware compression: the question is prefilled and compressed after the context, so SnapKV's
observation window is the question, as in the paper."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text
from transformers import DynamicCache

import kvtrim
from kvtrim.generation import greedy_decode, stop_token_ids
from kvtrim.models.prompting import encode, layout_for
from kvtrim.scorers import METHODS
from kvtrim.scorers.snapkv import SnapKVQueryAware

QUESTION = "Which word comes after the tower, near the river?"


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@dataclass
class WindowSpy(SnapKVQueryAware):
    """Records the positions of the observation window of every layer it scores."""

    seen: list = None  # type: ignore[assignment]

    def score(self, view):
        self.seen.append(view.query_positions[-self.window :].tolist())
        return super().score(view)


@pytest.mark.parametrize("chat", [True, False])
def test_the_observation_window_is_the_question(llama, chat):
    tok = make_tokenizer()
    context = sample_text(300)
    layout = layout_for(tok, context, chat)
    n_context = len(encode(tok, layout.context_text, layout.add_special_tokens))
    n_question = len(encode(tok, layout.question_prefix + QUESTION))
    spy = WindowSpy(window=n_question, seen=[])
    session = kvtrim.compress(llama, tok, context, spy, ratio=0.5, question=QUESTION, use_chat_template=chat)
    question_positions = list(range(n_context, n_context + n_question))
    assert spy.seen == [question_positions] * 3  # every layer's window: exactly the question's tokens
    assert session.context_length == n_context + n_question and session.question == QUESTION
    full = kvtrim.compress(llama, tok, context, "none", ratio=0.0, question=QUESTION, use_chat_template=chat)
    for kept, whole in zip(session.cache.layers, full.cache.layers, strict=True):
        assert kept.keys.shape[-2] < whole.keys.shape[-2]
        # SnapKV keeps its window: the question's pairs are all in the compressed cache
        assert torch.equal(kept.keys[..., -n_question:, :], whole.keys[..., n_context:, :])


@pytest.mark.parametrize("chat", [True, False])
def test_answer_equals_a_manual_prefill_of_context_and_question(llama, chat):
    tok = make_tokenizer()
    context = sample_text(260, seed=1)
    session = kvtrim.compress(
        llama, tok, context, "snapkv-query-aware", ratio=0.6, question=QUESTION, use_chat_template=chat
    )
    answer = session.answer(QUESTION, max_new_tokens=8, answer_prefix="It is")
    assert session.answer(None, max_new_tokens=8, answer_prefix="It is").token_ids == answer.token_ids
    layout = layout_for(tok, context, chat)
    ids = encode(tok, layout.context_text, layout.add_special_tokens) + encode(
        tok, layout.question_prefix + QUESTION
    )
    cache = DynamicCache(config=llama.config)
    with kvtrim.compressing(llama, "snapkv", ratio=0.6), torch.inference_mode():
        llama(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(len(ids))[None],
            cache=cache,
            use_cache=True,
        )
        tail = encode(tok, layout.question_suffix + "It is")
        expected = greedy_decode(llama, cache, tail, len(ids), 8, stop_token_ids(llama, tok))
    assert answer.token_ids == expected
    # with the question compressed the kept set differs from question-agnostic snapkv
    plain = kvtrim.compress(llama, tok, context, "snapkv", ratio=0.6, use_chat_template=chat)
    assert session.stats.kv_tokens_before > plain.stats.kv_tokens_before


def test_query_aware_user_errors(llama):
    tok = make_tokenizer()
    context = sample_text(120)
    assert METHODS["snapkv-query-aware"].query_aware and not METHODS["snapkv"].query_aware
    with pytest.raises(kvtrim.KVTrimError, match="pass question="):
        kvtrim.compress(llama, tok, context, "snapkv-query-aware", ratio=0.5)
    with pytest.raises(kvtrim.KVTrimError, match="question is empty"):
        kvtrim.compress(llama, tok, context, "snapkv-query-aware", ratio=0.5, question="  ")
    session = kvtrim.compress(llama, tok, context, "snapkv-query-aware", ratio=0.5, question="q?")
    with pytest.raises(kvtrim.KVTrimError, match="compress again"):
        session.ask("another question?")
    with pytest.raises(kvtrim.KVTrimError, match="window of 1024"):
        kvtrim.compress(llama, tok, sample_text(1000), "snapkv-query-aware", ratio=0.5, question="x" * 40)
    # any method may see the question; a plain session still refuses an empty one
    knorm = kvtrim.compress(llama, tok, context, "knorm", ratio=0.5, question="q?", budget="adaptive")
    assert knorm.budget == "adaptive" and knorm.ask(max_new_tokens=3) == knorm.ask("q?", max_new_tokens=3)
    with pytest.raises(kvtrim.KVTrimError, match="question is empty"):
        kvtrim.compress(llama, tok, context, "knorm", ratio=0.5).ask()
