"""Expected Attention with calibrated query statistics, CriticalKV and the DuoAttention head split,
each against a slow reference written plainly here (float64 loops on batch 0)."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from cli_runner import run_here
from conftest import close, make_model, make_tokenizer, sample_text
from test_methods import capture_views

import kvtrim
import kvtrim.calibration.artefacts as calibration
from kvtrim.budgets import DuoBudget, PyramidBudget
from kvtrim.cache.ragged import RaggedLayer
from kvtrim.calibration import (
    calibration_sequences,
    compute_query_stats,
    duo_heads,
    load_or_compute_query_stats,
)
from kvtrim.core.errors import KVTrimError
from kvtrim.core.selection import top_indices
from kvtrim.models.prompting import encode
from kvtrim.scorers import METHODS, LayerView, Scorer, make_scorer
from kvtrim.scorers.expected_attention import ExpectedAttention

views_of = functools.cache(capture_views)  # the views are only read: build each model once


# ---------------------------------------------------------------- expected attention, calibrated


def plain_query_stats(model, tokenizer, texts, n_sequences, seq_len, skip_first=4):
    """Every pre-RoPE query of every sequence, recomputed from the attention's input, then
    torch.mean / torch.cov in float64."""
    seqs = calibration_sequences(model, tokenizer, texts, n_sequences, seq_len)
    layers = model.model.layers
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def grab(i):
        def hook(_m, _args, kwargs):
            inputs[i].append(kwargs["hidden_states"][0].double())  # (T, hidden)

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for seq in seqs:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    for handle in handles:
        handle.remove()
    means, covs = [], []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        d, n_heads = attn.head_dim, model.config.num_attention_heads
        per_head = [[] for _ in range(n_heads)]
        for hidden in inputs[i]:
            with torch.no_grad():
                q = (hidden @ attn.q_proj.weight.double().T).view(-1, n_heads, d)  # (T, H, D)
                if hasattr(attn, "q_norm"):
                    q = attn.q_norm.double()(q)
                    attn.q_norm.float()
            for h in range(n_heads):
                per_head[h].append(q[skip_first:, h])
        stacked = [torch.cat(rows) for rows in per_head]  # H × (N, D)
        means.append(torch.stack([x.mean(0) for x in stacked]))
        covs.append(torch.stack([torch.cov(x.T, correction=0) for x in stacked]))
    return torch.stack(means), torch.stack(covs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_calibrated_query_stats_equal_a_plain_reference(arch, tokenizer):
    model = make_model(arch)
    texts = [sample_text(1500, seed=s) for s in range(2)]
    mean, cov = compute_query_stats(model, tokenizer, texts, n_sequences=3, seq_len=300)
    cfg = model.config
    assert mean.shape == (cfg.num_hidden_layers, cfg.num_attention_heads, 16)
    assert cov.shape == (*mean.shape, 16)
    ref_mean, ref_cov = plain_query_stats(model, tokenizer, texts, 3, 300)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cov.double(), ref_cov, rtol=1e-4, atol=1e-3)


def slow_expected_attention_given(
    view: LayerView, mu, sigma, rot, n_sink: int, use_cov: bool
) -> torch.Tensor:
    """The paper's closed form per query head with the given μ (H, D), Σ (H, D, D)."""
    keys, values = view.keys[0].double(), view.values[0].double()  # (Hkv, T, D)
    k_ok = view.key_positions >= n_sink
    rot = rot.double()
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for j in range(view.n_kv_heads):
        probs_sum = torch.zeros(keys.shape[1], dtype=torch.float64)
        for g in range(view.group_size):
            h = j * view.group_size + g
            mu_bar = rot @ mu[h].double()
            sigma_bar = rot @ sigma[h].double() @ rot.T
            logits = torch.full((keys.shape[1],), -math.inf, dtype=torch.float64)
            for t in range(keys.shape[1]):
                if k_ok[t]:
                    k = keys[j, t]
                    logits[t] = view.scaling * mu_bar @ k
                    if use_cov:
                        logits[t] += 0.5 * view.scaling**2 * k @ sigma_bar @ k
            probs_sum += torch.softmax(logits, 0)
        out[j] = torch.where(k_ok, probs_sum / view.group_size * values[j].norm(dim=-1), torch.inf)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("use_cov", [True, False])
def test_calibrated_scorer_is_the_closed_form_with_those_stats(arch, use_cov):
    model, views = views_of(arch, 120)
    view = views[-1]
    gen = torch.Generator().manual_seed(1)
    n_layers, h, d = len(views), view.n_heads, view.head_dim
    mean = torch.randn(n_layers, h, d, generator=gen)
    factor = torch.randn(n_layers, h, d, d, generator=gen) * 0.3
    cov = factor @ factor.transpose(-1, -2)  # (L, H, D, D) positive semi-definite
    scorer = make_scorer("expected-attention-calibrated", query_stats=(mean, cov), use_covariance=use_cov)
    start = int(view.query_positions[-1]) + 1
    rot = view.mean_rotation(torch.arange(start, start + scorer.n_future_positions))
    expected = slow_expected_attention_given(view, mean[view.layer_idx], cov[view.layer_idx], rot, 4, use_cov)
    close(scorer.score(view)[0], expected)
    # the context's own statistics give other scores: the option is not ignored
    assert not torch.allclose(ExpectedAttention(use_covariance=use_cov).score(view), scorer.score(view))


def test_calibrated_stats_are_cached_on_disk(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    model = make_model("qwen3")
    small = dict(n_sequences=2, seq_len=200)
    monkeypatch.setattr(calibration, "bundled_texts", lambda: [sample_text(3000, seed=3)])
    mean, cov = load_or_compute_query_stats(model, tokenizer, **small)
    assert [p.name for p in tmp_path.rglob("*.safetensors")] == ["query_stats.safetensors"]
    monkeypatch.setattr(calibration, "compute_query_stats", lambda *a, **k: pytest.fail("recomputed"))
    again = load_or_compute_query_stats(model, None)  # from disk: no tokenizer needed
    torch.testing.assert_close(again[0], mean)
    torch.testing.assert_close(again[1], cov)
    session = kvtrim.compress(
        model, tokenizer, sample_text(200), method="expected-attention-calibrated", ratio=0.5
    )
    assert session.stats.kv_bytes_after < session.stats.kv_bytes_before
    assert isinstance(session.ask("alpha?", max_new_tokens=3), str)


def test_calibrated_stats_recomputed_when_missing_or_stale(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    model = make_model("llama")
    with pytest.raises(KVTrimError, match="calibrate"):
        load_or_compute_query_stats(model, None)
    monkeypatch.setattr(calibration, "bundled_texts", lambda: [sample_text(3000, seed=3)])
    load_or_compute_query_stats(model, tokenizer, n_sequences=1, seq_len=100)
    monkeypatch.setattr(calibration, "QUERY_STATS_VERSION", calibration.QUERY_STATS_VERSION + 1)
    calls = []
    real = calibration.compute_query_stats
    monkeypatch.setattr(calibration, "compute_query_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_or_compute_query_stats(model, tokenizer, n_sequences=1, seq_len=100)
    assert calls == [1]


def test_bad_stats_source_is_a_user_error():
    with pytest.raises(KVTrimError, match="stats"):
        make_scorer("expected-attention", stats="future")
    assert METHODS["expected-attention-calibrated"].paper.startswith("arXiv")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    make_model("qwen3", max_positions=512).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def test_cli_calibrates_query_stats(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(2000, seed=5))
    args = ["calibrate", "--model", tiny_dir, "--text", str(text), "--sequences", "2", "--length", "200"]
    result = run_here(*args, "--what", "query-stats")
    assert result.returncode == 0, result.stderr
    assert "Query statistics (3, 4, 16) saved" in result.stdout
    assert [p.name for p in (tmp_path / "cache").rglob("*.safetensors")] == ["query_stats.safetensors"]


# ---------------------------------------------------------------- CriticalKV


def test_output_weight_splits_o_proj_per_head():
    model, views = views_of("qwen3", 120)
    view = views[1]
    attn = model.model.layers[1].self_attn
    d = view.head_dim
    per_head = torch.randn(view.n_heads, 5, d)  # (H, N, D): any per-head attention outputs
    through_heads = sum(per_head[h] @ view.output_weight[h] for h in range(view.n_heads))  # (N, hidden)
    concat = per_head.transpose(0, 1).reshape(5, view.n_heads * d)  # (N, H·D), as the model concatenates
    torch.testing.assert_close(through_heads, attn.o_proj(concat).detach(), rtol=1e-5, atol=1e-5)


def slow_critical(view: LayerView, model, base: torch.Tensor, budget: int, first_stage: float, eps: float):
    """Kept set of CriticalKV per kv-head, by explicit sorting; base: (Hkv, T) float64."""
    weight = model.model.layers[view.layer_idx].self_attn.o_proj.weight.detach().double()  # (hidden, H·D)
    d, seq = view.head_dim, view.keys.shape[2]
    kept = []
    for j in range(view.n_kv_heads):
        norms = []
        for t in range(seq):
            v = view.values[0, j, t].double()
            per_head = []
            for g in range(view.group_size):
                h = j * view.group_size + g
                per_head.append(float((weight[:, h * d : (h + 1) * d] @ v).abs().sum()))
            norms.append(sum(per_head) / len(per_head))
        # ranking: score descending, then the more recent position first
        by_base = sorted(range(seq), key=lambda t: (float(base[j, t]), t), reverse=True)
        first = by_base[: math.floor(first_stage * budget)]
        refined = {t: (float(base[j, t]) + eps) * norms[t] for t in range(seq)}
        refined = {t: math.inf if math.isinf(base[j, t]) else s for t, s in refined.items()}
        rest = sorted((t for t in range(seq) if t not in first), key=lambda t: (refined[t], t), reverse=True)
        kept.append(sorted(first + rest[: budget - len(first)]))
    return kept


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize(
    "options",
    [
        dict(base_options={"window": 8}),
        dict(base="expected-attention", base_options={"use_vnorm": False}, first_stage=0.75),
        dict(base="tova", epsilon=0.1),
    ],
)
def test_critical_keeps_the_two_stage_set(arch, options):
    model, views = views_of(arch, 120)
    view = views[-1]
    seq = view.keys.shape[2]
    assert view.budget_keep == seq - math.floor(0.5 * seq)  # captured at ratio 0.5, uniform budget
    scorer = make_scorer("critical", **options)
    base_scorer = make_scorer(scorer.base, **scorer.base_options)
    base = base_scorer.score(view)[0].double()  # (Hkv, T)
    scores = scorer.score(view)
    one_stage = make_scorer("critical", **{**options, "first_stage": 0.0})
    differs_from_base, differs_from_refined = [], []
    try:
        for budget in (view.budget_keep, 20):
            view.budget_keep = budget
            expected = slow_critical(view, model, base, budget, scorer.first_stage, scorer.epsilon)
            got = top_indices(scorer.score(view), budget)[0].tolist()
            assert got == expected
            differs_from_base.append(got != top_indices(base_scorer.score(view), budget)[0].tolist())
            differs_from_refined.append(got != top_indices(one_stage.score(view), budget)[0].tolist())
    finally:
        view.budget_keep = seq - math.floor(0.5 * seq)
    # both stages matter: the set is neither the base's top-k nor the refined score's alone
    assert any(differs_from_base) and any(differs_from_refined)
    assert torch.equal(scorer.score(view), scores)


def test_critical_without_a_budget_count_is_the_refined_score():
    model, views = views_of("llama", 120)
    view = views[-1]
    keep = view.budget_keep
    try:
        view.budget_keep = None  # a threshold budget: no stage 1
        scores = make_scorer("critical", base="tova").score(view)[0].double()
    finally:
        view.budget_keep = keep
    base = make_scorer("tova").score(view)[0].double()
    weight = model.model.layers[view.layer_idx].self_attn.o_proj.weight.detach().double()
    d = view.head_dim
    for j in range(view.n_kv_heads):
        for t in (0, 7, view.keys.shape[2] - 2):
            norm = (
                sum(
                    float((weight[:, h * d : (h + 1) * d] @ view.values[0, j, t].double()).abs().sum())
                    for h in range(j * view.group_size, (j + 1) * view.group_size)
                )
                / view.group_size
            )
            assert float(scores[j, t]) == pytest.approx((float(base[j, t]) + 1e-4) * norm, rel=1e-4)


class BudgetSpy(Scorer):
    name = "budget-spy"

    def __init__(self):
        self.seen = []

    def score(self, view):
        self.seen.append(view.budget_keep)
        return view.key_positions.float().expand(*view.keys.shape[:2], -1)


@pytest.mark.parametrize(
    ("budget", "options", "expected"),
    [
        ("uniform", {}, lambda t, i: t - math.floor(0.25 * t)),
        ("tokens", {"tokens": 30}, lambda t, i: 30),
        ("threshold", {"threshold": 0.0}, lambda t, i: None),
        ("pyramid", {"beta": 2.0}, lambda t, i: PyramidBudget(2.0).layer_keep(t, i, 3, 0.25)),
    ],
)
def test_views_carry_the_budgets_count(budget, options, expected, tokenizer):
    spy = BudgetSpy()
    session = kvtrim.compress(
        make_model("llama"),
        tokenizer,
        sample_text(100),
        method=spy,
        ratio=0.25,
        budget=budget,
        budget_options=options,
    )
    t = session.context_length
    assert spy.seen == [expected(t, i) for i in range(3)]


def test_critical_compresses_and_rejects_bad_options(tokenizer):
    model = make_model("qwen3")
    for budget in ("uniform", "adaptive"):
        session = kvtrim.compress(
            model, tokenizer, sample_text(300), method="critical", ratio=0.5, budget=budget
        )
        assert session.stats.kv_tokens_after == 3 * 2 * (session.context_length - session.context_length // 2)
        assert isinstance(session.ask("alpha?", max_new_tokens=3), str)
    chunked = kvtrim.compress(
        model,
        tokenizer,
        sample_text(300),
        method="critical",
        base="expected-attention",
        ratio=0.5,
        chunk_size=64,
    )
    assert chunked.stats.kv_bytes_after < chunked.stats.kv_bytes_before
    with pytest.raises(KVTrimError, match="chunked"):
        kvtrim.compress(model, tokenizer, sample_text(300), method="critical", ratio=0.5, chunk_size=64)
    for options in (dict(first_stage=1.5), dict(base="none"), dict(base="critical"), dict(base="nope")):
        with pytest.raises(KVTrimError):
            make_scorer("critical", **options)


# ---------------------------------------------------------------- DuoAttention head split


def plain_duo_heads(model, tokenizer, text, seq_len, sinks, window, depths):
    """needle / (needle + sinks + recent) attention mass from eager attention weights, in loops."""
    model.set_attn_implementation("eager")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    question = encode(duo_heads.DUO_QUESTION)
    haystack = encode(text)
    context_len = seq_len - len(question)
    sinks, window = min(sinks, context_len // 16), min(window, context_len // 4)
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    needle_mass = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, dtype=torch.float64)
    local_mass = torch.zeros_like(needle_mass)
    for i, depth in enumerate(depths):
        needle = encode(duo_heads.DUO_NEEDLE.format(value=duo_heads.DUO_VALUES[i]))
        ids, start = duo_heads.passkey_prompt(haystack, needle, question, seq_len, sinks, window, depth)
        assert ids[start : start + len(needle)] == needle and len(ids) == seq_len
        with torch.no_grad():
            attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        for layer, probs in enumerate(attentions):  # (1, H, T, T)
            for h in range(cfg.num_attention_heads):
                for row in range(seq_len - len(question), seq_len):
                    for col in range(row + 1):
                        p = float(probs[0, h, row, col])
                        if start <= col < start + len(needle):
                            needle_mass[layer, h // group] += p
                        elif col < sinks or col > row - window:
                            local_mass[layer, h // group] += p
    model.set_attn_implementation("sdpa")
    return needle_mass / (needle_mass + local_mass)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_duo_calibration_equals_a_plain_reference(arch, tokenizer):
    model = make_model(arch)
    text = sample_text(2000, seed=4)
    options = dict(seq_len=300, sinks=8, window=40, depths=(0.0, 0.5, 1.0))
    got = calibration.compute_duo_heads(model, tokenizer, [text], **options)
    assert got.shape == (3, 2)
    expected = plain_duo_heads(model, tokenizer, text, **options)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    again = calibration.compute_duo_heads(model, tokenizer, [text], **options)
    assert torch.equal(got, again)  # deterministic


def test_duo_heads_are_cached_on_disk(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "bundled_texts", lambda: [sample_text(3000, seed=3)])
    model = make_model("gemma3")
    heads = calibration.load_or_compute_duo_heads(model, tokenizer, seq_len=400)
    assert heads.shape == (4, 2)
    assert (heads[[0, 2]] == 0).all() and (heads[[1, 3]] > 0).all()  # sliding layers are not calibrated
    assert [p.name for p in tmp_path.rglob("*.safetensors")] == ["duo_heads.safetensors"]
    monkeypatch.setattr(calibration, "compute_duo_heads", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(calibration.load_or_compute_duo_heads(model, None), heads)
    session = kvtrim.compress(
        model,
        tokenizer,
        sample_text(300),
        method="streaming-llm",
        budget="duo",
        budget_options=dict(sinks=4, window=16),
    )
    assert session.stats.kv_bytes_after < session.stats.kv_bytes_before


def expected_duo_masks(heads, full_layers, seq, ratio, sinks, window, scores=None, fraction=None):
    """Kept (L, Hkv, T) masks written out: rank heads globally, count retrieval heads from the ratio."""
    n_layers, n_kv = heads.shape
    candidates = [
        (float(heads[li, j]), -(li * n_kv + j), li, j) for li in range(n_layers) for j in range(n_kv)
    ]
    candidates = sorted(
        (c for c in candidates if full_layers[c[2]]), reverse=True
    )  # ties: earlier head first
    n = len(candidates)
    stream = min(seq, sinks + window)
    budget = (seq - math.floor(ratio * seq)) * n
    if fraction is None:
        f = 1.0 if stream >= seq else min(1.0, max(0.0, (budget / n - stream) / (seq - stream)))
        n_ret, ret_keep = round(f * n), seq
    else:
        n_ret = round(fraction * n)
        ret_keep = int(min(seq, max(1, round((budget - stream * (n - n_ret)) / max(n_ret, 1)))))
    retrieval = {(c[2], c[3]) for c in candidates[:n_ret]}
    masks = torch.zeros(n_layers, n_kv, seq, dtype=torch.bool)
    for li in range(n_layers):
        for j in range(n_kv):
            if (li, j) in retrieval:
                best = sorted(range(seq), key=lambda t: (float(scores[li][j, t]), t), reverse=True)[:ret_keep]
                masks[li, j, best] = True
            else:
                masks[li, j] = torch.tensor([t < sinks or t >= seq - window for t in range(seq)])
    return masks, retrieval


@pytest.mark.parametrize("fraction", [None, 0.5])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_duo_kept_sets(ratio, fraction):
    gen = torch.Generator().manual_seed(2)
    heads = torch.rand(4, 3, generator=gen)
    heads[2, 1] = heads[0, 0]  # a tie: the earlier head ranks first
    full_layers = [True, True, False, True]
    seq, sinks, window = 200, 4, 20
    scores = [torch.rand(3, seq, generator=gen) for _ in range(4)]
    budget = DuoBudget(sinks=sinks, window=window, retrieval=fraction, heads=heads, full_layers=full_layers)
    expected, retrieval = expected_duo_masks(heads, full_layers, seq, ratio, sinks, window, scores, fraction)
    total = 0
    for layer in (0, 1, 3):
        got = budget.select(scores[layer][None], layer, 4, ratio)[0]  # (Hkv, T)
        assert torch.equal(got, expected[layer])
        total += int(got.sum())
        assert budget.layer_keep(seq, layer, 4, ratio) == round(int(got.sum()) / 3)
    streaming = [(li, j) for li in (0, 1, 3) for j in range(3) if (li, j) not in retrieval]
    for li, j in streaming:  # exactly sinks + window
        assert expected[li, j].nonzero().flatten().tolist() == [*range(sinks), *range(seq - window, seq)]
    if fraction is None:
        for li, j in retrieval:  # everything
            assert expected[li, j].all()
    uniform = 9 * (seq - math.floor(ratio * seq))
    if fraction is not None:  # never above the uniform budget (beyond rounding); below if T caps the share
        assert total <= uniform + 9
    elif ratio < 0.85:  # the uniform budget, up to one head's rounding
        assert abs(total - uniform) <= seq
    else:  # no retrieval head left: streaming heads cannot go below sinks + window
        assert not retrieval and total == 9 * (sinks + window)


def test_duo_short_context_keeps_everything_and_bad_options():
    budget = DuoBudget(sinks=4, window=20, heads=torch.rand(2, 2))
    assert budget.select(torch.rand(1, 2, 24), 0, 2, 0.9).all()
    with pytest.raises(KVTrimError, match="does not fit"):
        budget.select(torch.rand(1, 3, 50), 0, 2, 0.5)
    for options in (dict(window=0), dict(retrieval=1.5), dict(sinks=-1)):
        with pytest.raises(KVTrimError):
            DuoBudget(**options)


def reference_logits(model, ids: list[int], seq: int, kept: torch.Tensor) -> torch.Tensor:
    """Dense forward of context + question where, in layer l, question rows of query head h see only
    the context positions kept[l, h // group] (explicit per-head softmax attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        _, n_heads, total, _ = query.shape  # (B, H, T, D)
        group = n_heads // key.shape[1]
        out = torch.zeros_like(query)
        for h in range(n_heads):
            allowed = torch.ones(total, total, dtype=torch.bool).tril()  # (T, T) causal
            allowed[seq:, :seq] = kept[module.layer_idx, h // group]
            logits = scaling * query[0, h] @ key[0, h // group].T
            probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
            out[0, h] = probs @ value[0, h // group]
        return out.transpose(1, 2), None

    AttentionInterface.register("duo_reference", attention)
    AttentionMaskInterface.register("duo_reference", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("duo_reference")
    try:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0, seq:]
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("fraction", [None, 0.5])
def test_duo_compress_attends_exactly_to_each_heads_kept_set(arch, fraction, tokenizer):
    model = make_model(arch)
    heads = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.05]])
    budget = DuoBudget(sinks=4, window=16, retrieval=fraction, heads=heads)
    context = sample_text(160)
    session = kvtrim.compress(model, tokenizer, context, method="knorm", ratio=0.5, budget=budget)
    seq = session.context_length
    views = views_for(model, tokenizer, context)
    scores = [make_scorer("knorm").score(view)[0] for view in views]
    kept, retrieval = expected_duo_masks(heads, [True] * 3, seq, 0.5, 4, 16, scores, fraction)
    assert len(retrieval) == (3 if fraction else round((seq // 2 + seq % 2 - 20) / (seq - 20) * 6))
    for layer, cache_layer in enumerate(session.cache.layers):
        lengths = cache_layer.head_lengths() if isinstance(cache_layer, RaggedLayer) else [seq] * 2
        assert lengths == kept[layer].sum(-1).tolist()
        for j in range(2):  # each head holds exactly its kept pairs
            held = (
                cache_layer.head_keys[j][0]
                if isinstance(cache_layer, RaggedLayer)
                else cache_layer.keys[0, j]
            )
            assert torch.equal(held, views[layer].keys[0, j, kept[layer, j]])
    ctx = encode(tokenizer, session.layout.context_text)
    question = encode(tokenizer, session.layout.question_text("which?"))
    expected = reference_logits(model, ctx + question, seq, kept)
    with torch.inference_mode():
        positions = torch.arange(seq, seq + len(question))[None]
        got = model(input_ids=torch.tensor([question]), position_ids=positions, cache=session.cache).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert isinstance(session.ask("which?", max_new_tokens=3), str)


def views_for(model, tokenizer, context: str):
    """The views of a prefill of the same context (the scores duo ranks by). A prefill attends over
    the whole context before evicting, so every layer's keys are those of the uncompressed one."""
    from test_methods import Spy

    spy = Spy()
    kvtrim.compress(model, tokenizer, context, method=spy, ratio=0.5)
    return spy.views


def test_cli_ask_with_the_duo_budget(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path / "cache"))
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(450))
    ask = ["ask", str(doc), "-q", "q?", "--model", tiny_dir, "--json", "--max-new-tokens", "2"]
    result = run_here(*ask, "--method", "streaming-llm", "--budget", "duo", "--ratio", "0.6")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["budget"] == "duo" and report["kv_tokens_after"] < report["kv_tokens_before"]
    assert [p.name for p in (tmp_path / "cache").rglob("*.safetensors")] == ["duo_heads.safetensors"]
    result = run_here("calibrate", "--model", tiny_dir, "--what", "duo-heads", "--length", "300")
    assert result.returncode == 0, result.stderr
    assert "Duo head split (3, 2) saved" in result.stdout


def test_shared_prefill_scores_critical_per_ratio(tokenizer):
    """critical's scores depend on the budget: each shared-prefill cell equals compressing alone."""
    from kvtrim.strategies.shared_prefill import prefill_once

    model = make_model("qwen3")
    context = sample_text(240)
    shared = prefill_once(model, tokenizer, context, ["critical"], [0.25, 0.75])
    for ratio in (0.25, 0.75):
        alone = kvtrim.compress(model, tokenizer, context, method="critical", ratio=ratio)
        cell = shared.session("critical", ratio)
        for a, b in zip(alone.cache.layers, cell.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
