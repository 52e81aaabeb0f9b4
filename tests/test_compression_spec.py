"""CompressionSpec: one canonical string for every axis, parsed strictly, hashed stably, and the
same compression whether it comes as a spec, as keywords or as CLI flags."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim import CompressionSpec, KVTrimError
from kvtrim.cache import head_pairs
from kvtrim.core.spec import Cell, format_value, parse_value

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "text",
    [
        "knorm@0.5",
        "expected-attention:epsilon=0.01@0.5+adaptive",
        "knorm@0.75+tokens:tokens=512/chunk=256",
        "knorm@0.5/decode-budget=1024/evict-every=8",
        "snapkv@0.25/key-channels=0.5",
        "snapkv-query-aware@0.5/query-aware",
        'qfilters:calibration_text="/tmp/a b:c+d@e.txt"@0.25',
        'critical:base=snapkv:base_options={"kernel_size":3,"window":32}@0.5+adaptive:alpha=0.1',
        "none@0",
    ],
)
def test_canonical_strings_round_trip(text):
    spec = CompressionSpec.parse(text)
    assert str(spec) == text
    assert CompressionSpec.from_dict(spec.to_dict()) == spec
    assert hash(spec) == hash(CompressionSpec.parse(text))


def test_equal_compressions_are_one_spec():
    one = CompressionSpec.parse("expected-attention:use_vnorm=true:epsilon=1e-2@0.50+uniform")
    other = CompressionSpec(
        method="expected-attention", method_options={"epsilon": 0.01, "use-vnorm": True}, ratio=0.5
    )
    assert one == other and hash(one) == hash(other) and one.digest() == other.digest()
    assert str(one) == "expected-attention:epsilon=0.01:use_vnorm=true@0.5"
    assert CompressionSpec.parse("knorm") == CompressionSpec(method="knorm")  # ratio 0.5 by default
    # evict_every means nothing without a decoding budget: it does not make another spec
    assert CompressionSpec(method="knorm", evict_every=4) == CompressionSpec(method="knorm")


def test_digest_is_the_same_in_another_process():
    text = "expected-attention:epsilon=0.01@0.5+adaptive/key-channels=0.25"
    code = f"import kvtrim; print(kvtrim.CompressionSpec.parse({text!r}).digest())"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == CompressionSpec.parse(text).digest() and len(other) == 16


def test_values_keep_their_kind():
    for value in (
        True,
        False,
        None,
        0,
        12,
        0.01,
        1e16,
        -1.5,
        "snapkv",
        "12",
        "true",
        "a b",
        [1, 2],
        {"a": 1},
    ):
        assert parse_value(format_value(value)) == value
        assert type(parse_value(format_value(value))) is type(value)
    assert format_value(1e16) == "1e16"  # never a '+' inside a spec


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty spec"),
        ("knorm@x", "ratio"),
        ("knorm@1", "ratio must be in"),
        ("knorm+a+b", "more than one budget"),
        ("knorm@0.5@0.2", "more than one ratio"),
        ("knorm/chunk=0", "chunk_size"),
        ("knorm/decode-budget=8/evict-every=9", "evict_every"),
        ("knorm/decode-budget=0", "decoding budget"),
        ("knorm/warp=3", "Unknown part"),
        ("knorm:epsilon", "Bad option"),
        ("knorm:a=1:a=2", "twice"),
        ("knorm/key-channels=1", "key_channels"),
        ('qfilters:calibration_text="unclosed@0.5', "Bad JSON"),
    ],
)
def test_bad_specs_are_one_clear_error(text, message):
    with pytest.raises(KVTrimError, match=message) as err:
        CompressionSpec.parse(text)
    assert "\n" not in str(err.value)


def test_cells_are_a_specs_sweep_coordinates():
    spec = CompressionSpec.parse("expected-attention:epsilon=0.01@0.25+adaptive:alpha=0.1")
    assert spec.cell == Cell("expected-attention:epsilon=0.01", 0.25, "adaptive:alpha=0.1")
    assert spec.cell == ("expected-attention:epsilon=0.01", 0.25, "adaptive:alpha=0.1")
    assert CompressionSpec.from_cell(spec.cell) == spec


def test_spec_keywords_and_strings_compress_alike(tokenizer):
    model = make_model("llama")
    context = sample_text(200)
    by_keywords = kvtrim.compress(
        model,
        tokenizer,
        context,
        "expected-attention",
        0.5,
        budget="adaptive",
        budget_options={"alpha": 0.5},
        epsilon=0.01,
    )
    text = "expected-attention:epsilon=0.01@0.5+adaptive:alpha=0.5"
    for spec in (text, CompressionSpec.parse(text)):
        by_spec = kvtrim.compress(model, tokenizer, context, spec=spec)
        assert str(by_spec.spec) == str(by_keywords.spec) == text
        for a, b in zip(by_spec.cache.layers, by_keywords.cache.layers, strict=True):
            for (ka, va), (kb, vb) in zip(head_pairs(a), head_pairs(b), strict=True):
                assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert by_spec.ask("Which?", max_new_tokens=5) == by_keywords.ask("Which?", max_new_tokens=5)


def test_wrong_kind_of_option_is_refused_before_any_work():
    tok, model = make_tokenizer(), make_model("llama")
    with pytest.raises(KVTrimError, match="epsilon must be a number, got 'abc'"):
        kvtrim.compress(model, tok, "text", "expected-attention:epsilon=abc")
    with pytest.raises(KVTrimError, match="alpha must be a number"):
        kvtrim.compress(model, tok, "text", "knorm", budget="adaptive:alpha=high")
    with pytest.raises(KVTrimError, match="use_vnorm must be true or false"):
        kvtrim.compress(model, tok, "text", "expected-attention", use_vnorm="yes")
