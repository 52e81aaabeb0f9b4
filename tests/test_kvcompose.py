"""KVCompose's global budget against a slow reference (composite tokens ranked one by one), and the
deferred eviction it needs: one-shot, by reconstruction (KVzip) and refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from conftest import sample_text

import kvtrim
from kvtrim.budgets import make_budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def slow_kvcompose(scores: dict[int, torch.Tensor], ratio: float) -> dict[int, list[list[int]]]:
    """Per layer, per head, the kept positions: composite j of layer l = mean over heads of their
    j-th best score; every layer keeps its best composite, the rest go one by one to the best."""
    composites = []
    orders = {}
    for idx, layer_scores in scores.items():
        heads = layer_scores[0].double()  # (Hkv, T)
        orders[idx] = [
            sorted(range(heads.shape[1]), key=lambda t, h=h: -float(heads[h, t])) for h in range(len(heads))
        ]
        ranked = [[float(heads[h, t]) for t in orders[idx][h]] for h in range(len(heads))]
        for j in range(1, heads.shape[1]):
            composites.append((sum(r[j] for r in ranked) / len(ranked), idx, j))
    total = sum(n_keep(s.shape[-1], ratio) for s in scores.values())
    counts = dict.fromkeys(scores, 1)
    for _, idx, _ in sorted(composites, key=lambda c: -c[0])[: total - len(scores)]:
        counts[idx] += 1
    return {idx: [sorted(order[: counts[idx]]) for order in orders[idx]] for idx in scores}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_kvcompose_matches_the_slow_reference(ratio):
    gen = torch.Generator().manual_seed(0)
    scores = {i: torch.rand(1, 3, 40 + 5 * i, generator=gen) * (1 + i) for i in (0, 1, 3)}
    got = make_budget("kvcompose").select_layers(scores, ratio)
    expected = slow_kvcompose(scores, ratio)
    assert {idx: chosen[0].tolist() for idx, chosen in got.items()} == expected
    assert sum(c.shape[-1] for c in got.values()) == sum(n_keep(s.shape[-1], ratio) for s in scores.values())


def test_kvcompose_compresses_once_the_prefill_is_scored(llama, tok):
    context = sample_text(300)
    composed = kvtrim.compress(llama, tok, context, method="snapkv", budget="kvcompose", ratio=0.5)
    uniform = kvtrim.compress(llama, tok, context, method="snapkv", ratio=0.5)
    assert composed.stats.kv_tokens_after == uniform.stats.kv_tokens_after
    assert composed.stats.layers_compressed == uniform.stats.layers_compressed
    kept = [layer.keys.shape[2] for layer in composed.cache.layers]
    assert kept == composed.stats.per_layer_kept and len(set(kept)) > 1
    assert isinstance(composed.ask("Which word?", max_new_tokens=3), str)
    zipped = kvtrim.compress(llama, tok, context, method="kvzip", budget="kvcompose", ratio=0.5)
    assert zipped.stats.kv_tokens_after == uniform.stats.kv_tokens_after


def test_kvcompose_is_refused_where_it_cannot_work(llama, tok):
    with pytest.raises(KVTrimError, match="evicts every layer at once"):
        kvtrim.compress(llama, tok, sample_text(200), spec="knorm@0.5+kvcompose/decode-budget=48")
    with pytest.raises(KVTrimError, match="evicts every layer at once"):
        kvtrim.compress(llama, tok, sample_text(200), spec="knorm@0.5+kvcompose/key-channels=0.5")
    with pytest.raises(KVTrimError, match="Batches work with"):
        kvtrim.compress(llama, tok, ["a b c", "d e f"], spec="knorm@0.5+kvcompose")
    with pytest.raises(KVTrimError, match="min_keep"):
        make_budget("kvcompose:min_keep=0")
