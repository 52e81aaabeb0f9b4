"""Cell batches: many compressed caches of one context answered together, each row exactly its own
session (logits to float rounding, greedy answers token for token), padding really hidden."""

from __future__ import annotations

import pytest
import torch
from conftest import close, make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim.bench.config import BenchConfig
from kvtrim.bench.plan import cell_chunks as _cell_chunks
from kvtrim.bench.results import row_key
from kvtrim.bench.run import run_bench
from kvtrim.cache import CacheSnapshot
from kvtrim.cache.masked import HeadMaskedLayer
from kvtrim.core.errors import KVTrimError
from kvtrim.strategies import cell_batch
from kvtrim.strategies.cell_batch import answer_cells, stack_caches
from kvtrim.strategies.shared_prefill import prefill_once

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["none", "knorm", "snapkv", "streaming-llm", "tova"]
RATIOS = [0.0, 0.3, 0.6]
BUDGETS = ["uniform", "adaptive", "pyramid"]
QUESTION = "Which word comes first?"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def all_sessions(model, tok, text: str = sample_text(300)):
    prefill = prefill_once(model, tok, text, METHODS, RATIOS, budgets=BUDGETS)
    return [prefill.session(*cell) for cell in prefill.cells()]


def last_logits_alone(session, ids: list[int]) -> torch.Tensor:
    """The question's last logits over the session's own cache (restored afterwards): (V,)."""
    snapshot = CacheSnapshot.take(session.cache)
    try:
        with torch.inference_mode():
            positions = torch.arange(session.context_length, session.context_length + len(ids))[None]
            out = session.model(
                input_ids=torch.tensor([ids]), position_ids=positions, cache=session.cache, use_cache=True
            )
    finally:
        snapshot.restore(session.cache)
    return out.logits[0, -1]


def last_logits_batched(sessions, ids: list[int]) -> torch.Tensor:
    """The same for every session at once, through a cell batch: (B, V)."""
    cache = stack_caches(sessions, room=len(ids))
    first = sessions[0]
    positions = torch.arange(first.context_length, first.context_length + len(ids))[None]
    with torch.inference_mode():
        out = first.model(
            input_ids=torch.tensor([ids] * len(sessions)),
            position_ids=positions.expand(len(sessions), -1),
            cache=cache,
            use_cache=True,
        )
    return out.logits[:, -1]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "mistral", "gemma3"])
def test_each_row_is_its_own_session(arch, tok):
    model = make_model(arch)
    sessions = all_sessions(model, tok)
    assert any(hasattr(layer, "head_keys") for s in sessions for layer in s.cache.layers)  # ragged rows
    _, ids = sessions[0].prompt_ids(QUESTION, 8)
    kvtrim.attention.enable(model)
    batched = last_logits_batched(sessions, ids)
    for row, session in enumerate(sessions):
        close(batched[row], last_logits_alone(session, ids), rtol=1e-4, atol=1e-5)
    answers = answer_cells(sessions, QUESTION, max_new_tokens=8)
    for answer, session in zip(answers, sessions, strict=True):
        alone = session.answer(QUESTION, max_new_tokens=8)
        assert answer.token_ids == alone.token_ids
        assert answer.text == alone.text


def test_padding_slots_are_hidden(tok, monkeypatch):
    """With every slot made visible (padding included), rows with padding change: the mask matters."""
    model = make_model("llama")
    sessions = all_sessions(model, tok)
    _, ids = sessions[0].prompt_ids(QUESTION, 8)
    kvtrim.attention.enable(model)
    honest = last_logits_batched(sessions, ids)
    stack = HeadMaskedLayer.stack.__func__

    def leaky(cls, rows, room):
        layer = stack(cls, rows, room)
        layer.visible[:] = True
        return layer

    monkeypatch.setattr(HeadMaskedLayer, "stack", classmethod(leaky))
    leaked = last_logits_batched(sessions, ids)
    full = sessions[0].cache.layers[0].keys.shape[2]
    padded = [r for r, s in enumerate(sessions) if min(_head_lengths(s)) < full]
    assert padded
    for row in padded:
        assert not torch.allclose(honest[row], leaked[row], atol=1e-3)


def _head_lengths(session) -> list[int]:
    lengths = []
    for layer in session.cache.layers:
        if hasattr(layer, "head_keys"):
            lengths += layer.head_lengths()
        else:
            lengths += [layer.keys.shape[2]] * layer.keys.shape[1]
    return lengths


def test_rows_that_stop_leave_the_batch_and_answers_stay_exact(tok, monkeypatch):
    model = make_model("qwen3")
    sessions = all_sessions(model, tok)
    alone = [s.answer(QUESTION, max_new_tokens=12).token_ids for s in sessions]
    # a stop token some rows meet early and others later or never
    counts: dict[int, int] = {}
    for tokens in alone:
        for token in set(tokens[1:]):
            counts[token] = counts.get(token, 0) + 1
    stop = min(counts, key=lambda t: abs(counts[t] - len(sessions) / 2))
    monkeypatch.setattr(cell_batch, "stop_token_ids", lambda model, tokenizer: {stop})
    monkeypatch.setattr(kvtrim.sessions.session, "stop_token_ids", lambda model, tokenizer: {stop})
    expected = [s.answer(QUESTION, max_new_tokens=12).token_ids for s in sessions]
    assert len({len(t) for t in expected}) > 1  # rows really stop at different steps
    got = answer_cells(sessions, QUESTION, max_new_tokens=12)
    assert [a.token_ids for a in got] == expected


def test_sessions_are_left_untouched(tok):
    model = make_model("llama")
    sessions = all_sessions(model, tok)[:6]
    before = [
        [(layer.keys, layer.values) for layer in s.cache.layers if hasattr(layer, "keys")] for s in sessions
    ]
    answer_cells(sessions, QUESTION, max_new_tokens=4)
    after = [
        [(layer.keys, layer.values) for layer in s.cache.layers if hasattr(layer, "keys")] for s in sessions
    ]
    for b, a in zip(before, after, strict=True):
        for (kb, vb), (ka, va) in zip(b, a, strict=True):
            assert kb is ka and vb is va


def test_query_aware_cells_share_one_prefill_with_the_question(tok):
    """prefill_once(question=) holds what compress(question=) holds, and the batch answers as each."""
    model = make_model("llama")
    text = sample_text(300)
    prefill = prefill_once(
        model,
        tok,
        text,
        ["snapkv-query-aware"],
        [0.3, 0.6],
        budgets=["uniform", "adaptive"],
        question=QUESTION,
    )
    sessions = [prefill.session(*cell) for cell in prefill.cells()]
    for (method, ratio, budget), session in zip(prefill.cells(), sessions, strict=True):
        alone = kvtrim.compress(model, tok, text, method, ratio, budget=budget, question=QUESTION)
        assert session.context_length == alone.context_length
        assert session.stats.kv_tokens_after == alone.stats.kv_tokens_after
        assert session.answer(max_new_tokens=6).token_ids == alone.answer(max_new_tokens=6).token_ids
    answers = answer_cells(sessions, QUESTION, max_new_tokens=6)
    assert [a.token_ids for a in answers] == [s.answer(max_new_tokens=6).token_ids for s in sessions]
    with pytest.raises(KVTrimError, match="needs the question"):
        prefill_once(model, tok, text, ["snapkv-query-aware"], [0.5])
    with pytest.raises(KVTrimError, match="takes no question"):
        prefill_once(model, tok, text, ["kvzip"], [0.5], question=QUESTION)


def test_refusals(tok):
    llama = make_model("llama")
    one = kvtrim.compress(llama, tok, sample_text(200), "knorm", 0.5)
    other = kvtrim.compress(llama, tok, sample_text(240, seed=1), "knorm", 0.5)
    with pytest.raises(KVTrimError, match="same model and context"):
        answer_cells([one, other], QUESTION)
    with pytest.raises(KVTrimError, match="No session"):
        answer_cells([], QUESTION)
    with pytest.raises(KVTrimError, match="empty"):
        answer_cells([one], " ")
    thinned = kvtrim.compress(llama, tok, sample_text(200), "knorm", 0.5, key_channels=0.5)
    with pytest.raises(KVTrimError, match="pruned channels"):
        answer_cells([thinned], QUESTION)
    decoding = kvtrim.compress(llama, tok, sample_text(200), "knorm", 0.5, decode_budget=64)
    with pytest.raises(KVTrimError, match="decoding"):
        answer_cells([decoding], QUESTION)


def test_cell_chunks_group_by_budget_and_ratio():
    cells = [("none", 0.0, "uniform")]
    for budget in ("uniform", "adaptive"):
        for ratio in (0.25, 0.5):
            cells += [(m, ratio, budget) for m in ("a", "b", "c", "d", "e")]
    chunks = _cell_chunks(cells, 6)
    assert sorted(c for chunk in chunks for c in chunk) == sorted(cells)
    assert all(len(chunk) <= 6 for chunk in chunks)
    # the uncompressed cell joins the first group; no other chunk mixes groups
    assert [len(c) for c in chunks] == [6, 5, 5, 5]
    for chunk in chunks[1:]:
        assert len({(budget, ratio) for _, ratio, budget in chunk}) == 1
    assert [len(c) for c in _cell_chunks(cells[1:6], 2)] == [1, 2, 2]  # balanced, never above 2


def test_bench_rows_with_cell_batches_equal_one_by_one(tok, tmp_path):
    model = make_model("llama", max_positions=2048)
    config = BenchConfig(
        tasks=["passkey", "niah_single_1", "perplexity"],
        methods=["knorm", "snapkv", "snapkv-query-aware", "streaming-llm"],
        ratios=[0.0, 0.25, 0.5],
        budgets=["uniform", "adaptive"],
        length=640,
        samples=2,
        max_new_tokens=6,
        ppl_tokens=32,
    )
    alone = run_bench(model, tok, config, tmp_path / "alone", progress=False).rows
    batched = run_bench(model, tok, config, tmp_path / "batched", progress=False, cell_batch=5).rows
    assert len(batched) == len(alone)
    reference = {row_key(r): r for r in alone}
    for row in batched:
        ref = reference[row_key(row)]
        for name in ("prediction", "score", "kv_bytes_after", "kv_tokens_after", "context_tokens", "nll"):
            assert row.get(name) == ref.get(name), (row_key(row), name)
        assert row.get("cell_batch", 1) <= 5
    assert any(row.get("cell_batch", 1) > 1 for row in batched)
    assert not any(row.get("cell_batch") for row in batched if row["task"] == "perplexity")
