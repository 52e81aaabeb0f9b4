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


# ---------------------------------------------------------------- FINCH: the window is the question


@dataclass
class LengthSpy(SnapKVQueryAware):
    """Records the question length every view carries."""

    lengths: list = None  # type: ignore[assignment]

    def score(self, view):
        self.lengths.append(view.question_length)
        return super().score(view)


def slow_finch(view, n_question: int, chunk: int) -> torch.Tensor:
    """(Hkv, T): mean attention of the question's queries (explicit softmax per query, causal),
    averaged over each kv-head's group; then 1 − rank/n inside each context chunk; question +inf."""
    queries, keys = view.queries(rotated=True)[0].double(), view.keys[0].double()  # (H, T, D), (Hkv, T, D)
    seq = keys.shape[1]
    n_context = seq - n_question
    attention = torch.zeros(view.n_kv_heads, seq, dtype=torch.float64)
    for h in range(view.n_heads):
        for t in range(n_context, seq):
            logits = keys[h // view.group_size, : t + 1] @ queries[h, t] * view.scaling
            attention[h // view.group_size, : t + 1] += torch.softmax(logits, 0) / (
                n_question * view.group_size
            )
    out = torch.full((view.n_kv_heads, seq), torch.inf, dtype=torch.float64)
    for j in range(view.n_kv_heads):
        for start in range(0, n_context, chunk):
            part = attention[j, start : min(start + chunk, n_context)]
            order = torch.argsort(part, descending=True).tolist()
            for rank, i in enumerate(order):
                out[j, start + i] = 1.0 - rank / len(part)
    return out, attention


def test_views_carry_the_question_length_only_in_the_prefill(llama):
    tok = make_tokenizer()
    context = sample_text(300)
    n_question = len(encode(tok, layout_for(tok, context, None).question_prefix + QUESTION))
    spy = LengthSpy(window=8, lengths=[])
    kvtrim.compress(llama, tok, context, spy, ratio=0.5, question=QUESTION)
    assert spy.lengths == [n_question] * 3
    plain = LengthSpy(window=8, lengths=[])
    plain.query_aware = False
    kvtrim.compress(llama, tok, context, plain, ratio=0.5)
    assert plain.lengths == [0] * 3


@pytest.mark.parametrize("chunk", [16, 64, 100000])
def test_finch_matches_the_slow_reference(llama, chunk):
    from test_methods import Spy

    from kvtrim.core.selection import top_indices
    from kvtrim.scorers import make_scorer

    tok = make_tokenizer()
    context = sample_text(200, seed=3)
    spy = Spy()
    spy.query_aware = True
    kvtrim.compress(llama, tok, context, spy, ratio=0.5, question=QUESTION)
    view = spy.views[-1]
    expected, attention = slow_finch(view, view.question_length, chunk)
    got = make_scorer(f"finch:chunk_size={chunk}").score(view)[0]  # (Hkv, T)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got.double()[finite], expected[finite], rtol=0, atol=1e-6)
    n_context = int(finite[0].sum())
    kept = top_indices(got[None], view.question_length + n_context // 2)[0, 0]  # (K,)
    per_chunk = torch.bincount(kept[kept < n_context] // chunk)  # every full chunk: the same count
    full_chunks = per_chunk[: n_context // chunk]
    if len(full_chunks) > 1:
        assert int(full_chunks.max() - full_chunks.min()) <= 1
    whole = make_scorer("finch:chunk_size=0").score(view)[0]  # no chunks: the attention itself
    torch.testing.assert_close(whole.double()[finite], attention[finite], rtol=1e-4, atol=1e-7)


def test_finch_keeps_every_chunk_its_share_and_answers(llama):
    tok = make_tokenizer()
    session = kvtrim.compress(
        llama, tok, sample_text(320), "finch:chunk_size=40", ratio=0.5, question=QUESTION
    )
    assert session.stats.kv_tokens_after < session.stats.kv_tokens_before
    assert isinstance(session.ask(QUESTION, max_new_tokens=3), str)
    with pytest.raises(kvtrim.KVTrimError, match="needs the question"):
        kvtrim.compress(llama, tok, sample_text(320), "finch", ratio=0.5)
    with pytest.raises(kvtrim.KVTrimError, match="chunk_size must be >= 0"):
        kvtrim.compress(llama, tok, sample_text(320), "finch:chunk_size=-1", ratio=0.5, question=QUESTION)
