"""Saved sessions: every cache kind round-trips and answers exactly as before; a different model
or tokenizer, a newer format, a truncated or bit-flipped file each give one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim.cache.layers import head_pairs, is_sliding
from kvtrim.core.errors import KVTrimError
from kvtrim.sessions.stored import MANIFEST, TENSORS

CASES = [
    ("llama", dict(method="knorm", ratio=0.5)),  # uniform: dense layers
    ("llama", dict(method="expected-attention", ratio=0.5, budget="adaptive")),  # ragged heads
    ("qwen3", dict(method="knorm", ratio=0.5, key_channels=0.5)),  # channel-pruned keys
    ("gemma3", dict(method="knorm", ratio=0.5)),  # sliding-window layers
    ("gemma3", dict(method="tova", ratio=0.5, windows=True)),  # windows compressed within themselves
    ("llama", dict(method="knorm", ratio=0.5, chunk_size=64)),  # chunked prefill
    ("qwen3", dict(method="snapkv", ratio=0.6, budget="threshold", budget_options={"threshold": 0.01})),
]


@pytest.mark.parametrize("arch,options", CASES)
def test_a_saved_session_answers_exactly_as_the_original(arch, options, tmp_path):
    model, tokenizer = make_model(arch), make_tokenizer()
    session = kvtrim.compress(model, tokenizer, sample_text(300), **options)
    expected = session.answer("which one?", max_new_tokens=8).token_ids
    session.save(tmp_path / "s")
    fresh = make_model(arch)  # the same weights, in a model kvtrim has not touched yet
    loaded = kvtrim.load_session(fresh, tokenizer, tmp_path / "s")
    assert [type(layer) for layer in loaded.cache.layers] == [type(layer) for layer in session.cache.layers]
    assert loaded.answer("which one?", max_new_tokens=8).token_ids == expected
    assert loaded.spec == session.spec and loaded.context_length == session.context_length
    assert loaded.stats == session.stats
    for mine, theirs in zip(session.cache.layers, loaded.cache.layers, strict=True):
        assert is_sliding(mine) == is_sliding(theirs)
        if getattr(mine, "key_channels", None) is None:
            for (ka, va), (kb, vb) in zip(head_pairs(mine), head_pairs(theirs), strict=True):
                assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.fixture
def saved(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    session = kvtrim.compress(
        model, tokenizer, sample_text(200), method="knorm", ratio=0.5, budget="adaptive"
    )
    return model, tokenizer, session.save(tmp_path / "s")


def test_another_model_or_tokenizer_is_refused(saved):
    _, tokenizer, path = saved
    other = make_model("llama", seed=1)  # same architecture, other weights
    with pytest.raises(KVTrimError, match="another model"):
        kvtrim.load_session(other, tokenizer, path)
    model = saved[0]
    with pytest.raises(KVTrimError, match="another tokenizer"):
        kvtrim.load_session(model, make_tokenizer(chat_template=False), path)


def test_a_newer_format_is_refused(saved):
    model, tokenizer, path = saved
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KVTrimError, match="format 99.*Upgrade kvtrim"):
        kvtrim.load_session(model, tokenizer, path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove", "manifest"])
def test_a_damaged_file_is_refused(saved, damage):
    model, tokenizer, path = saved
    data = bytearray((path / TENSORS).read_bytes())
    if damage == "truncate":
        (path / TENSORS).write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0x01
        (path / TENSORS).write_bytes(bytes(data))
    elif damage == "remove":
        (path / TENSORS).unlink()
    else:
        (path / MANIFEST).write_text("{not json")
    with pytest.raises(KVTrimError):
        kvtrim.load_session(model, tokenizer, path)


def test_a_session_evicting_while_decoding_is_not_saved(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    session = kvtrim.compress(model, tokenizer, sample_text(200), method="knorm", ratio=0.5, decode_budget=64)
    with pytest.raises(KVTrimError, match="evicts while decoding"):
        session.save(tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_a_batch_element_is_a_session_that_saves_and_answers_as_its_row(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    contexts = [sample_text(300, seed=1), sample_text(180, seed=2)]
    batch = kvtrim.compress(model, tokenizer, contexts, method="knorm", ratio=0.5)
    rows = batch.answer(["first?", "second?"], max_new_tokens=8)
    for b, question in enumerate(["first?", "second?"]):
        element = batch.element(b)
        alone = kvtrim.compress(model, tokenizer, contexts[b], method="knorm", ratio=0.5)
        assert element.stats.kv_bytes_after == alone.stats.kv_bytes_after
        element.save(tmp_path / str(b))
        loaded = kvtrim.load_session(make_model("llama"), tokenizer, tmp_path / str(b))
        assert loaded.answer(question, max_new_tokens=8).token_ids == rows[b].token_ids
    with pytest.raises(KVTrimError, match="contexts 0..1"):
        batch.element(2)
