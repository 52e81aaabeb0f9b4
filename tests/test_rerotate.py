"""Key re-rotation (``/rerotate``): kept keys move to positions 0..K−1 by explicit RoPE matrices,
the cache becomes an ordinary prefix plain transformers continues, and every combination it
cannot serve is refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, sample_text
from test_methods import rope_matrix

import kvtrim
from kvtrim import CompressionSpec, KVTrimError
from kvtrim.models.forward import forward

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")
QUESTION = "Which word comes first?"


def test_nothing_evicted_nothing_moves(llama, tok):
    context = sample_text(150)
    plain = kvtrim.compress(llama, tok, context, spec="none@0.5")
    moved = kvtrim.compress(llama, tok, context, spec="none@0.5/rerotate")
    assert moved.first_position == plain.first_position == plain.context_length
    for a, b in zip(plain.cache.layers, moved.cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-6)
    assert moved.ask(QUESTION, max_new_tokens=8) == plain.ask(QUESTION, max_new_tokens=8)


def test_kept_keys_turn_to_their_new_index(llama, tok):
    context = sample_text(150)
    full = kvtrim.compress(llama, tok, context, spec="none@0.5")
    kept = kvtrim.compress(llama, tok, context, spec="knorm@0.5")
    moved = kvtrim.compress(llama, tok, context, spec="knorm@0.5/rerotate")
    n_kept = kept.cache.layers[0].keys.shape[2]
    assert moved.next_position == moved.first_position == n_kept < moved.context_length
    theta = getattr(llama.config, "rope_theta", None) or llama.config.rope_parameters["rope_theta"]
    for layer in range(len(full.cache.layers)):
        old_keys = kept.cache.layers[layer].keys[0].double()  # (Hkv, K, D) at their true positions
        new_keys = moved.cache.layers[layer].keys[0].double()
        every = full.cache.layers[layer].keys[0].double()  # (Hkv, T, D)
        for h in range(old_keys.shape[0]):
            for j in range(n_kept):
                # the kept key's true position: where it sits in the uncompressed cache
                old = int((every[h] - old_keys[h, j]).abs().sum(-1).argmin())
                expected = rope_matrix(j - old, llama.config.head_dim, theta) @ old_keys[h, j]
                torch.testing.assert_close(new_keys[h, j], expected, rtol=1e-4, atol=1e-5)


def test_the_cache_is_an_ordinary_prefix_plain_transformers_continues(llama, tok):
    context = sample_text(150)
    ids = torch.tensor([tok(QUESTION, add_special_tokens=False)["input_ids"]])  # (1, n)
    for spec, ordinary in (("knorm@0.5/rerotate", True), ("knorm@0.5", False)):
        session = kvtrim.compress(llama, tok, context, spec=spec)
        start = session.first_position
        kvtrim_logits = forward(
            llama, ids, torch.arange(start, start + ids.shape[1])[None], copy.deepcopy(session.cache)
        ).logits
        with torch.inference_mode():  # no positions given: transformers counts from the cache's length
            plain = llama(input_ids=ids, cache=copy.deepcopy(session.cache), use_cache=True).logits[:, -1:]
        assert kvtrim_logits.shape == plain.shape
        assert torch.allclose(kvtrim_logits, plain, atol=1e-4) == ordinary


def test_a_rerotated_session_answers_saves_and_loads(llama, tok, tmp_path):
    session = kvtrim.compress(llama, tok, sample_text(200), spec="snapkv@0.5/rerotate/evicted=merge")
    assert str(session.spec) == "snapkv@0.5/evicted=merge/rerotate"
    answer = session.ask(QUESTION, max_new_tokens=10)
    session.save(tmp_path / "saved")
    loaded = kvtrim.load_session(llama, tok, tmp_path / "saved")
    assert loaded.first_position == session.first_position < loaded.context_length
    assert loaded.ask(QUESTION, max_new_tokens=10) == answer


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("knorm@0.5/chunk=32/rerotate", "does not combine with chunked prefill"),
        ("knorm@0.5/decode-budget=64/rerotate", "does not combine"),
        ("knorm@0.5/key-channels=0.5/rerotate", "key channels"),
        ("kvzip@0.5/rerotate", "'kvzip'"),
        ("knorm@0.5+adaptive/rerotate", "not 'adaptive'"),
        ("knorm@0.5+pyramid/rerotate", "not 'pyramid'"),
    ],
)
def test_what_rerotation_cannot_do_is_refused(llama, tok, spec, fragment):
    with pytest.raises(KVTrimError, match=fragment):
        kvtrim.compress(llama, tok, sample_text(100), spec=spec)


def test_rerotation_refuses_batches_generate_and_sliding_layers(llama, tok):
    with pytest.raises(KVTrimError, match="key re-rotation"):
        kvtrim.compress(llama, tok, ["a b c", "d e f"], spec="knorm@0.5/rerotate")
    with pytest.raises(KVTrimError, match="generate"), kvtrim.compressing(llama, spec="knorm@0.5/rerotate"):
        pass
    with pytest.raises(KVTrimError, match="sliding-window layers"):
        kvtrim.compress(make_model("gemma3"), tok, sample_text(100), spec="knorm@0.5/rerotate")


def test_the_spec_part_and_the_cli_flag():
    spec = CompressionSpec.parse("knorm@0.5/rerotate")
    assert spec.rerotate and str(spec) == "knorm@0.5/rerotate"
    assert CompressionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(KVTrimError, match="rerotate"):
        CompressionSpec.parse("knorm@0.5/rerotate=yes")
    import argparse

    from kvtrim.cli.common import add_compression_arguments, add_method_arguments, spec_from_args

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    add_compression_arguments(parser)
    assert spec_from_args(parser.parse_args(["--method", "knorm", "--rerotate"])) == spec
    merged = spec_from_args(parser.parse_args(["--method", "knorm", "--evicted", "merge"]))
    assert merged.evicted == "merge" and not merged.rerotate
