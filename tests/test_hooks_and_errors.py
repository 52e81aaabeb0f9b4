"""Hooks never outlive a call, and every mistake a user can make gives the documented error."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.models import attention_modules, query_projection
from kvtrim.scorers.base import Scorer


def _hook_count(model) -> int:
    total = 0
    for attn in attention_modules(model):
        proj, _ = query_projection(attn)
        total += len(attn._forward_hooks) + len(proj._forward_hooks)
    return total


class Exploding(Scorer):
    name = "exploding"

    def score(self, view):
        raise RuntimeError("boom")


def test_hooks_removed_after_compress_and_on_exceptions(tokenizer):
    model = make_model("llama")
    kvtrim.compress(model, tokenizer, sample_text(100), method="knorm", ratio=0.5)
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        kvtrim.compress(model, tokenizer, sample_text(100), method=Exploding(), ratio=0.5)
    assert _hook_count(model) == 0
    with pytest.raises(KeyError), kvtrim.compressing(model, "knorm", ratio=0.5):
        assert _hook_count(model) > 0
        raise KeyError("user code failed")
    assert _hook_count(model) == 0


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "abc"])
def test_bad_ratio(tokenizer, ratio):
    with pytest.raises(kvtrim.KVTrimError, match="ratio"):
        kvtrim.compress(make_model("llama"), tokenizer, "some text", method="knorm", ratio=ratio)


def test_unknown_method(tokenizer):
    with pytest.raises(kvtrim.KVTrimError, match="Unknown method 'snapkvv'"):
        kvtrim.compress(make_model("llama"), tokenizer, "some text", method="snapkvv")


def test_bad_method_option(tokenizer):
    with pytest.raises(kvtrim.KVTrimError, match="Bad option"):
        kvtrim.compress(make_model("llama"), tokenizer, "some text", method="knorm", n_sink=3)


@pytest.mark.parametrize("context", ["", "   \n"])
def test_empty_context(tokenizer, context):
    with pytest.raises(kvtrim.KVTrimError, match="empty"):
        kvtrim.compress(make_model("llama"), tokenizer, context)


def test_context_longer_than_window(tokenizer):
    model = make_model("llama", max_positions=128)
    with pytest.raises(kvtrim.KVTrimError, match="window of 128"):
        kvtrim.compress(model, tokenizer, sample_text(200), method="knorm")
    session = kvtrim.compress(model, tokenizer, sample_text(90), method="knorm")
    with pytest.raises(kvtrim.KVTrimError, match="exceed the model's window"):
        session.ask("q?", max_new_tokens=40)


def test_unsupported_architecture(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=110))
    with pytest.raises(kvtrim.KVTrimError, match="Unsupported architecture 'gpt2'.*Llama"):
        kvtrim.compress(model, tokenizer, "some text")


def test_missing_model_path(tmp_path):
    with pytest.raises(kvtrim.KVTrimError, match="GGUF file not found"):
        kvtrim.load_model(tmp_path / "nope.gguf")
    with pytest.raises(kvtrim.KVTrimError, match="Cannot load model"):
        kvtrim.load_model("no-such-org/no-such-model-kvtrim-test")


def test_load_model_from_local_directory(tmp_path, tokenizer):
    model = make_model("qwen3")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = kvtrim.load_model(tmp_path)
    assert loaded.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_corrupt_gguf_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(kvtrim.KVTrimError, match="Cannot load the GGUF file"):
        kvtrim.load_model(bad)
