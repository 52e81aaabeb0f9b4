"""Budget policies: exact counts and safeguards; ragged heads attend exactly to their kept sets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.attention.ragged import reference_varlen_attn as reference_varlen
from kvtrim.budgets import (
    AdaptiveBudget,
    PyramidBudget,
    ThresholdBudget,
    TokenBudget,
    UniformBudget,
    make_budget,
)
from kvtrim.cache import CacheSnapshot
from kvtrim.cache.ragged import RaggedLayer
from kvtrim.core.ratios import n_keep
from kvtrim.models.prompting import encode
from kvtrim.scorers.base import LayerView, Scorer


def test_uniform_and_token_budgets_count_exactly():
    scores = torch.randn(2, 3, 50)
    assert UniformBudget().select(scores, 0, 4, 0.3).shape == (2, 3, n_keep(50, 0.3))
    assert TokenBudget(20).select(scores, 0, 4, 0.0).shape == (2, 3, 20)
    assert TokenBudget(80).select(scores, 0, 4, 0.0).shape == (2, 3, 50)
    assert not TokenBudget(80).evicts(50, 0.0) and TokenBudget(20).evicts(50, 0.0)


def test_pyramid_decreases_with_depth_and_keeps_the_average():
    budget = PyramidBudget(beta=20)
    keeps = [budget.layer_keep(1000, layer, 10, 0.5) for layer in range(10)]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] > keeps[-1]
    assert abs(sum(keeps) / 10 - 500) <= 1
    assert budget.layer_keep(1000, 0, 10, 0.25) == 750  # no room for a pyramid: uniform


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_adaptive_total_and_safeguard(alpha):
    torch.manual_seed(0)
    scores = torch.randn(1, 4, 100)
    scores[0, 0] += 5.0  # head 0 dominates the joint ranking
    mask = AdaptiveBudget(alpha=alpha).select(scores, 0, 1, 0.5)
    keep = n_keep(100, 0.5)
    assert int(mask.sum()) == 4 * keep
    per_head = mask.sum(-1)[0]
    safeguard = math.floor(alpha * keep)
    assert bool((per_head >= safeguard).all())
    for head in range(4):  # the safeguard is each head's own best pairs
        best = scores[0, head].topk(safeguard).indices
        assert bool(mask[0, head, best].all())
    if alpha < 1:
        assert int(per_head[0]) > keep  # uneven: the dominant head got more than a uniform share


def kvpress_adakv_keep(scores: torch.Tensor, n_kept: int, alpha: float) -> torch.Tensor:
    """AdaKV as the reference library (kvpress 0.5.5, ``AdaKVPress.compress``) writes it, for a
    slow reference: each head's top ``max(1, int(n_kept·alpha))`` scores raised to the float
    maximum, then the bottom Hkv·(T − n_kept) scores of the whole layer pruned. -> (B, Hkv, T) kept."""
    bsz, heads, seq = scores.shape
    scores = scores.clone()
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 and n_kept > 0 else 0
    scores.scatter_(-1, torch.topk(scores, n_safe, dim=-1).indices, torch.finfo(scores.dtype).max)
    pruned = torch.topk(-scores.reshape(bsz, -1), heads * (seq - n_kept), dim=1).indices
    keep = torch.ones(bsz, heads * seq, dtype=torch.bool)
    keep.scatter_(1, pruned, False)
    return keep.view(bsz, heads, seq)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("seq,ratio", [(100, 0.5), (240, 0.75), (64, 0.875)])
def test_adaptive_keeps_what_the_reference_librarys_adakv_keeps_on_the_same_scores(alpha, seq, ratio):
    torch.manual_seed(seq)
    scores = torch.rand(2, 3, seq) * torch.tensor([1.0, 3.0, 0.2])[None, :, None]  # heads on their own scales
    scores[:, :, :4] = torch.inf  # sinks, as kvtrim's scorers mark them (the reference pads them to max + 1)
    kept = AdaptiveBudget(alpha=alpha).select(scores, 0, 1, ratio)
    reference = kvpress_adakv_keep(
        scores.nan_to_num(posinf=float(scores[scores.isfinite()].max()) + 1), int(seq * (1 - ratio)), alpha
    )
    # the two round alike here; at 101 pairs and ratio 0.5 kvtrim keeps T − floor(r·T) = 51 per
    # head on average and the reference int(T·(1 − r)) = 50
    assert n_keep(seq, ratio) == int(seq * (1 - ratio))
    assert torch.equal(kept, reference)


def test_threshold_keeps_scores_above_tau_and_never_empties_a_head():
    scores = torch.tensor([[[0.1, 0.9, 0.5], [0.2, 0.1, 0.3]]])
    mask = ThresholdBudget(0.5).select(scores, 0, 1, 0.0)
    assert mask.tolist() == [[[False, True, True], [False, False, True]]]


def test_threshold_with_a_window_keeps_the_latest_pairs_too():
    scores = torch.tensor([[[0.9, 0.1, 0.2, 0.1], [0.1, 0.1, 0.1, 0.6]]])
    mask = ThresholdBudget(0.5, window=2).select(scores, 0, 1, 0.0)
    assert mask.tolist() == [[[True, False, True, True], [False, False, True, True]]]
    with pytest.raises(kvtrim.KVTrimError, match="window must be >= 0"):
        make_budget("threshold:threshold=0.5:window=-1")


def test_the_cli_names_every_registered_budget():
    from kvtrim.budgets import BUDGETS
    from kvtrim.cli.common import BUDGET_NAMES

    assert sorted(BUDGET_NAMES) == sorted(BUDGETS)


def test_unknown_budget():
    with pytest.raises(kvtrim.KVTrimError, match="Unknown budget"):
        make_budget("nope")


class FixedScores(Scorer):
    """Scores that depend only on (head, position): every layer keeps the same per-head sets."""

    name = "fixed"

    def score(self, view: LayerView) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        seq = view.keys.shape[2]
        table = torch.rand(view.n_kv_heads, 4096, generator=gen)[:, :seq]  # (Hkv, T)
        return table[None].expand(view.keys.shape[0], -1, -1).clone()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "mistral"])
def test_ragged_attention_equals_dense_masked_reference(arch, tokenizer):
    model = make_model(arch)
    context, question = sample_text(160), "which?"
    session = kvtrim.compress(
        model, tokenizer, context, method=FixedScores(), budget="threshold", budget_options={"threshold": 0.5}
    )
    layers = session.cache.layers
    assert all(isinstance(layer, RaggedLayer) for layer in layers)
    lengths = layers[0].head_lengths()
    assert len(set(lengths)) > 1  # really uneven
    # Reference: one dense forward of context + question with a per-head 4-D mask in which the
    # question rows see only the kept context positions of their KV head.
    ctx_ids = encode(tokenizer, session.layout.context_text)
    q_ids = encode(tokenizer, session.layout.question_text(question))
    seq, total = len(ctx_ids), len(ctx_ids) + len(q_ids)
    keep = (
        FixedScores().score(
            LayerView(0, torch.zeros(1, len(lengths), seq, 1), None, None, None, 0, 0, 1.0, None, None)
        )[0]
        >= 0.5
    )  # (Hkv, T)
    heads, group = model.config.num_attention_heads, model.config.num_attention_heads // len(lengths)
    mask = torch.ones(total, total, dtype=torch.bool).tril()[None, None].repeat(1, heads, 1, 1)
    for head in range(heads):
        mask[0, head, seq:, :seq] = keep[head // group]
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ctx_ids + q_ids]), attention_mask=mask).logits[0, seq:]
        positions = torch.arange(seq, total)[None]
        got = model(input_ids=torch.tensor([q_ids]), position_ids=positions, cache=session.cache).logits[0]
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_ragged_bytes_equal_kept_pairs_and_answers_restore(tokenizer):
    model = make_model("llama")
    session = kvtrim.compress(
        model, tokenizer, sample_text(300), method="knorm", ratio=0.5, budget="adaptive"
    )
    cfg = model.config
    kept = sum(layer.n_pairs() for layer in session.cache.layers)
    assert (
        session.stats.kv_tokens_after
        == kept
        == cfg.num_hidden_layers * cfg.num_key_value_heads * n_keep(session.context_length, 0.5)
    )
    assert session.stats.kv_bytes_after == kept * 2 * cfg.head_dim * 4
    first = session.answer("q?", max_new_tokens=6).token_ids
    assert session.answer("q?", max_new_tokens=6).token_ids == first
    assert sum(layer.n_pairs() for layer in session.cache.layers) == kept


@pytest.mark.parametrize("budget", ["pyramid", "adaptive"])
def test_every_budget_runs_with_any_scorer(tokenizer, budget):
    model = make_model("qwen2")
    for method in ("expected-attention", "snapkv", "streaming-llm"):
        session = kvtrim.compress(model, tokenizer, sample_text(400), method=method, ratio=0.6, budget=budget)
        assert session.stats.kv_bytes_after < session.stats.kv_bytes_before
        assert isinstance(session.ask("q?", max_new_tokens=3), str)


def test_pyramid_layers_have_their_own_lengths(tokenizer):
    """Layers of different lengths in one cache: each layer gets a mask of its own length."""
    model = make_model("llama")
    session = kvtrim.compress(model, tokenizer, sample_text(300), method="knorm", ratio=0.5, budget="pyramid")
    lengths = [layer.keys.shape[2] for layer in session.cache.layers]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert isinstance(session.ask("which one?", max_new_tokens=4), str)


def test_mask_rebuilt_for_a_layer_of_another_length():
    from kvtrim.attention import kvtrim_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    query, key, value = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    wrong_length_mask = torch.ones(1, 1, 3, 14, dtype=torch.bool)  # made for another layer
    out, _ = kvtrim_attention(module, query, key, value, wrong_length_mask, scaling=0.5)
    logits = (query @ key.transpose(-1, -2)) * 0.5  # (1, 2, 3, 10)
    allowed = torch.arange(10)[None, :] <= 7 + torch.arange(3)[:, None]  # context visible, new causal
    expected = torch.softmax(logits.masked_fill(~allowed, -torch.inf), -1) @ value
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_varlen_packing_of_ragged_heads_equals_the_per_head_loop(arch, tokenizer, monkeypatch):
    """The packed variable-length path (one kernel call for all heads, CUDA) gives the per-head
    loop's decoding logits; the kernel is replaced by a plain reference so this runs on CPU."""
    from kvtrim.attention import ragged

    model = make_model(arch)
    monkeypatch.setattr(ragged, "_compiled_kernel_for", lambda query, key: None)  # the loop on CPU
    session = kvtrim.compress(model, tokenizer, sample_text(200), "knorm", ratio=0.5, budget="adaptive")
    assert len(set(session.cache.layers[0].head_lengths())) > 1
    loop = session.answer("which?", max_new_tokens=6)
    calls = []

    def packed(query, key):
        if query.shape[2] != 1:
            return None  # multi-token forwards keep the loop, as on CUDA
        calls.append(1)
        return reference_varlen

    monkeypatch.setattr(ragged, "_varlen_kernel_for", packed)
    varlen = session.answer("which?", max_new_tokens=6)
    assert calls and varlen.token_ids == loop.token_ids
    # and the same logits for one decoding step
    got = _one_step_logits(model, session)
    monkeypatch.setattr(ragged, "_varlen_kernel_for", lambda query, key: None)
    torch.testing.assert_close(got, _one_step_logits(model, session), atol=1e-5, rtol=1e-5)


def _one_step_logits(model, session) -> torch.Tensor:
    """The logits of one decoding step over the session's cache, which is put back afterwards."""
    step = dict(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[session.context_length]]))
    snapshot = CacheSnapshot.take(session.cache)
    with torch.inference_mode():
        logits = model(**step, cache=session.cache).logits
    snapshot.restore(session.cache)
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_compiled_cpu_kernel_decodes_as_the_per_head_loop(arch, tokenizer, monkeypatch):
    """Decoding steps over ragged layers go through the compiled CPU kernel (one call per layer)
    and give the per-head loop's tokens and logits."""
    from kvtrim.attention import cpu_kernels, ragged

    if not cpu_kernels.has_compiler():
        pytest.skip("no C++ compiler here: kvtrim runs the per-head loop")
    model = make_model(arch)
    session = kvtrim.compress(model, tokenizer, sample_text(200), "knorm", ratio=0.5, budget="adaptive")
    assert len(set(session.cache.layers[0].head_lengths())) > 1
    calls = []
    compiled_for = ragged._compiled_kernel_for

    def counted(query, key):
        kernel = compiled_for(query, key)
        calls.append(kernel is not None)
        return kernel

    monkeypatch.setattr(ragged, "_compiled_kernel_for", counted)
    compiled = session.answer("which?", max_new_tokens=6)
    assert any(calls), "decoding steps run the compiled kernel"
    got = _one_step_logits(model, session)
    monkeypatch.setattr(ragged, "_compiled_kernel_for", lambda query, key: None)
    assert session.answer("which?", max_new_tokens=6).token_ids == compiled.token_ids
    torch.testing.assert_close(got, _one_step_logits(model, session), atol=1e-5, rtol=1e-5)
