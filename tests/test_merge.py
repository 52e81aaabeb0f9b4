"""Merge-on-evict (``/evicted=merge``): against a slow reference written from its definition, and
end to end — same kept set and bytes as dropping, different values, nothing changed when nothing
is evicted."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim import CompressionSpec, KVTrimError
from kvtrim.cache.merge import merge_evicted

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def slow_merge(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One evicted pair at a time, in float64 Python: the definition in kvtrim.cache.merge."""
    out = values.clone().double()
    bsz, heads, seq, _ = keys.shape
    for b in range(bsz):
        for h in range(heads):
            kept = [t for t in range(seq) if keep[b, h, t]]
            groups: dict[int, list[tuple[float, torch.Tensor]]] = {i: [] for i in kept}
            for j in range(seq):
                if keep[b, h, j] or not kept:
                    continue
                sims = [
                    torch.cosine_similarity(keys[b, h, j].double(), keys[b, h, i].double(), 0) for i in kept
                ]
                best = max(range(len(kept)), key=lambda n: float(sims[n]))
                groups[kept[best]].append((max(float(sims[best]), 0.0), values[b, h, j].double()))
            for i, absorbed in groups.items():
                own = values[b, h, i].double()
                weight = 1.0 + sum(w for w, _ in absorbed)
                mean = (own + sum((w * v for w, v in absorbed), torch.zeros_like(own))) / weight
                norm = (own.norm() + sum(w * v.norm() for w, v in absorbed)) / weight
                out[b, h, i] = mean * (norm / mean.norm())
    return out


def test_merge_matches_the_slow_reference():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 17, 8, generator=gen)
    values = torch.randn(2, 3, 17, 8, generator=gen)
    keep = torch.rand(2, 3, 17, generator=gen) < 0.4
    keep[0, 0] = True  # a head evicting nothing
    keep[0, 1, 5] = True
    got = merge_evicted(keys, values, keep)
    expected = slow_merge(keys, values, keep)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[~keep], values[~keep])  # evicted rows are left alone (they are dropped next)
    assert torch.equal(got[0, 0], values[0, 0])


def test_a_pair_unlike_every_kept_one_adds_nothing():
    keys = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]]])  # (1, 1, 2, 2): the evicted key points away
    values = torch.tensor([[[[1.0, 2.0], [5.0, -7.0]]]])
    keep = torch.tensor([[[True, False]]])
    assert torch.equal(merge_evicted(keys, values, keep)[0, 0, 0], values[0, 0, 0])


def test_identical_pairs_merge_to_the_same_value():
    keys = torch.ones(1, 1, 4, 3)
    values = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])[None, None]
    keep = torch.tensor([[[False, True, False, False]]])
    merged = merge_evicted(keys, values, keep)
    assert math.isclose(float(merged[0, 0, 1].norm()), math.sqrt(2), rel_tol=1e-6)


@pytest.mark.parametrize("spec", ["knorm@0.5", "snapkv@0.5+adaptive", "knorm@0.5/chunk=32", "kvzip@0.5"])
def test_merging_keeps_the_same_pairs_and_bytes_but_other_values(llama, tok, spec):
    context = sample_text(160)
    dropped = kvtrim.compress(llama, tok, context, spec=spec)
    merged = kvtrim.compress(llama, tok, context, spec=spec + "/evicted=merge")
    assert merged.spec.evicted == "merge" and str(merged.spec).endswith("/evicted=merge")
    assert merged.stats.kv_bytes_after == dropped.stats.kv_bytes_after
    assert merged.stats.kv_tokens_after == dropped.stats.kv_tokens_after
    differs = False
    one_shot = "chunk" not in spec  # later chunks see the merged values, so their keys move too
    for a, b in zip(dropped.cache.layers, merged.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) or not one_shot  # keys (and so the kept set) are untouched
        differs |= not torch.equal(a.values, b.values)
    assert differs
    assert isinstance(merged.ask("Which word?", max_new_tokens=3), str)


def test_merging_nothing_changes_nothing(llama, tok):
    context = sample_text(120)
    plain = kvtrim.compress(llama, tok, context, spec="none@0.5")
    merged = kvtrim.compress(llama, tok, context, spec="none@0.5/evicted=merge")
    q = "Which word comes first?"
    assert merged.ask(q, max_new_tokens=6) == plain.ask(q, max_new_tokens=6)


def test_merging_while_decoding(llama, tok):
    spec = "knorm@0.5/decode-budget=48/evict-every=8"
    context = sample_text(160)
    dropped = kvtrim.compress(llama, tok, context, spec=spec)
    merged = kvtrim.compress(llama, tok, context, spec=spec + "/evicted=merge")
    dropped.ask("Which word?", max_new_tokens=20)
    merged.ask("Which word?", max_new_tokens=20)
    assert merged.stats.decode_evictions == dropped.stats.decode_evictions > 0


def test_the_evicted_axis_is_checked():
    assert CompressionSpec.parse("knorm@0.5/evicted=drop") == CompressionSpec.parse("knorm@0.5")
    with pytest.raises(KVTrimError, match="drop, merge, cam"):
        CompressionSpec.parse("knorm@0.5/evicted=fold")
    with pytest.raises(KVTrimError, match="drop, merge, cam"):
        CompressionSpec(method="knorm", evicted="fold")
    with pytest.raises(KVTrimError, match="merging evicted pairs"):
        kvtrim.compress(make_model("llama"), make_tokenizer(), ["a b", "c d"], spec="knorm@0.5/evicted=merge")


# ---------------------------------------------------------------- CaM, while decoding


def slow_cam(values, keep, scores, draws, window):
    """CaM per evicted pair with explicit loops: the next ``window`` kept pairs (the last ones when
    fewer follow) each get value / window when the draw falls below min(1, s / mean s_window)."""
    out = values.double().clone()
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            kept = [t for t in range(keep.shape[2]) if keep[b, h, t]]
            for e in range(keep.shape[2]):
                if keep[b, h, e]:
                    continue
                after = [t for t in kept if t > e]
                targets = after[:window] if len(after) >= window else kept[-window:]
                mean = sum(max(float(scores[b, h, t]), 0.0) for t in targets) / len(targets)
                p = 0.0 if math.isinf(mean) else min(1.0, max(float(scores[b, h, e]), 0.0) / mean)
                if float(draws[b, h, e]) < p:
                    for t in targets:
                        out[b, h, t] += values[b, h, e].double() / len(targets)
    return out


@pytest.mark.parametrize("window", [1, 4, 50])
def test_cam_matches_the_slow_reference(window):
    from kvtrim.cache.cam import cam_merge

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 30, 8, generator=gen)
    scores = torch.rand(2, 3, 30, generator=gen)
    scores[0, 0, 0] = torch.inf  # an always-kept sink: a window holding it merges nothing
    keep = torch.rand(2, 3, 30, generator=gen) < 0.4
    keep[..., 0] = True
    got = cam_merge(values, keep, scores, torch.Generator().manual_seed(7), window)
    draws = torch.rand(keep.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(
        got.double(), slow_cam(values, keep, scores, draws, window), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(got[~keep], values[~keep])  # evicted rows as they were


def test_cam_merges_while_decoding_reproducibly(llama, tok):
    spec = "expected-attention@0.5/decode-budget=48/evict-every=8"  # scores: expected attention
    context = sample_text(160)
    dropped = kvtrim.compress(llama, tok, context, spec=spec)
    cam = kvtrim.compress(llama, tok, context, spec=spec + "/evicted=cam")
    first = cam.ask("Which word?", max_new_tokens=20)
    dropped.ask("Which word?", max_new_tokens=20)
    assert cam.stats.decode_evictions == dropped.stats.decode_evictions > 0
    assert cam.ask("Which word?", max_new_tokens=20) == first  # the same draws each time
    assert [layer.keys.shape for layer in cam.cache.layers] == [
        layer.keys.shape for layer in dropped.cache.layers
    ]
    with pytest.raises(KVTrimError, match="evicted=cam merges at the evictions made while decoding"):
        kvtrim.compress(llama, tok, context, spec="expected-attention@0.5/evicted=cam")
