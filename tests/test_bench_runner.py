"""The benchmark runner: shared prefill = separate prefills, bit for bit; resume loses and duplicates
nothing; the configuration guards the folder; perplexity is the model's own at ratio 0."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text
from transformers import DynamicCache

import kvtrim
from kvtrim.bench.config import BenchConfig, resolve_tasks
from kvtrim.bench.continuation import continuation_nll, perplexity
from kvtrim.bench.evaluate import CellEvaluator
from kvtrim.bench.results import CONFIG_FILE, RESULTS_FILE, read_results, row_key
from kvtrim.bench.run import run_bench
from kvtrim.bench.samples import build_samples
from kvtrim.bench.tasks.perplexity import continuation_ids
from kvtrim.generation import greedy_decode, stop_token_ids
from kvtrim.models.prompting import encode, layout_for
from kvtrim.scorers import METHODS
from kvtrim.scorers.simple import KNorm

COMPARED = ("prediction", "score", "kv_bytes_after", "kv_tokens_after", "kv_bytes_before", "nll", "n_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", max_positions=2048)


def small_config(**changes) -> BenchConfig:
    options = dict(
        tasks=["passkey", "niah_single_1", "perplexity"],
        methods=["knorm", "expected-attention"],
        ratios=[0.0, 0.5],
        length=640,
        samples=2,
        max_new_tokens=6,
        ppl_tokens=32,
    )
    return BenchConfig(**{**options, **changes})


@pytest.fixture(scope="module")
def reference(llama, tok, tmp_path_factory):
    """One uninterrupted shared-prefill run: 3 tasks x 2 samples x 3 cells."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_bench(llama, tok, small_config(), out, progress=False)
    return {row_key(r): r for r in summary.rows}


def test_cells_merge_ratio_zero_and_none():
    config = small_config(methods=["knorm", "none", "qfilters"], ratios=[0.5, 0, 0.25])
    assert config.cells() == [
        ("none", 0.0, "uniform"),
        ("knorm", 0.25, "uniform"),
        ("knorm", 0.5, "uniform"),
        ("qfilters", 0.25, "uniform"),
        ("qfilters", 0.5, "uniform"),
    ]
    assert small_config(ratios=[0.5]).cells() == [
        ("knorm", 0.5, "uniform"),
        ("expected-attention", 0.5, "uniform"),
    ]
    with pytest.raises(kvtrim.KVTrimError, match="Unknown method"):
        small_config(methods=["nope"])
    with pytest.raises(kvtrim.KVTrimError, match="ratio"):
        small_config(ratios=[1.0])


def test_budget_axis_cells_and_refusals():
    config = small_config(methods=["knorm"], ratios=[0, 0.5], budgets=["uniform", "adaptive", "pyramid"])
    # the ratio-0 cell evicts nothing whatever the budget: one baseline cell
    assert config.cells() == [
        ("none", 0.0, "uniform"),
        ("knorm", 0.5, "uniform"),
        ("knorm", 0.5, "adaptive"),
        ("knorm", 0.5, "pyramid"),
    ]
    for budget in ("tokens", "threshold"):
        with pytest.raises(kvtrim.KVTrimError, match="ignores the ratio"):
            small_config(budgets=["uniform", budget])
    with pytest.raises(kvtrim.KVTrimError, match="Unknown budget 'nope'"):
        small_config(budgets=["nope"])
    with pytest.raises(kvtrim.KVTrimError, match="No budget"):
        small_config(budgets=[])
    qa = small_config(methods=["snapkv", "snapkv-query-aware"], ratios=[0.5])
    assert ("snapkv-query-aware", 0.5, "uniform") in qa.task_cells("passkey")
    assert qa.task_cells("perplexity") == [("snapkv", 0.5, "uniform")]  # no question to see


def test_resolve_tasks():
    assert resolve_tasks("niah_single_1,vt,perplexity") == ["niah_single_1", "vt", "perplexity"]
    assert "qa_1" not in resolve_tasks("ruler") and "cwe" in resolve_tasks("ruler")
    assert resolve_tasks("ruler", "ruler") == ["ruler"]
    with pytest.raises(kvtrim.KVTrimError, match="unknown task"):
        resolve_tasks("nope")


def test_shared_prefill_rows_equal_separate_prefills(reference, llama, tok, tmp_path):
    alone = run_bench(llama, tok, small_config(), tmp_path, share=False, progress=False)
    assert len(alone.rows) == len(reference) == 3 * 2 * 3
    for row in alone.rows:
        ref = reference[row_key(row)]
        for name in COMPARED:
            assert row.get(name) == ref.get(name), (row_key(row), name)
        assert ref["shared_prefill"] and ref["prefill_cells"] == 3
        assert not row["shared_prefill"] and row["prefill_cells"] == 1
    compressed = [r for r in reference.values() if r["method"] != "none"]
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in compressed)
    ppl = {r["method"]: r["perplexity"] for r in reference.values() if r["task"] == "perplexity"}
    assert set(ppl) == {"none", "knorm", "expected-attention"}


def test_rows_carry_what_a_report_needs(reference):
    row = next(r for r in reference.values() if r["task"] == "passkey")
    assert set(row) >= {
        "prediction",
        "references",
        "score",
        "metric",
        "kv_bytes_before",
        "kv_bytes_after",
        "prefill_s",
        "score_s",
        "eval_s",
        "seed",
        "versions",
        "metadata",
    }
    assert row["versions"]["kvtrim"] == kvtrim.__version__ and "transformers" in row["versions"]
    assert 0 <= row["score"] <= 100 and row["references"]


def test_resume_after_interruption_loses_and_duplicates_nothing(reference, llama, tok, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CellEvaluator._row

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the second sample's cells
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CellEvaluator, "_row", dying)
    with pytest.raises(KeyboardInterrupt):
        run_bench(llama, tok, small_config(), tmp_path, progress=False)
    monkeypatch.setattr(CellEvaluator, "_row", original)
    assert len(read_results(tmp_path / RESULTS_FILE)) == 4
    with open(tmp_path / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write('{"task": "passkey", "index": 1, "method": "kn')  # died while writing a row
    resumed = run_bench(llama, tok, small_config(), tmp_path, progress=False)
    assert (resumed.written, resumed.skipped) == (14, 4)
    rows = read_results(tmp_path / RESULTS_FILE)
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == len(reference)
    assert set(keys) == set(reference)
    for row in rows:
        for name in COMPARED:
            assert row.get(name) == reference[row_key(row)].get(name)
    again = run_bench(llama, tok, small_config(), tmp_path, progress=False)
    assert (again.written, again.skipped) == (0, 18)


def test_results_file_tolerates_only_a_truncated_last_line(tmp_path):
    path = tmp_path / RESULTS_FILE
    good = json.dumps({"task": "t", "index": 0, "method": "none", "ratio": 0.0})
    path.write_text(good + "\n" + '{"task": "t", "ind')
    assert len(read_results(path, repair=True)) == 1
    assert path.read_text() == good + "\n"
    path.write_text(good)  # complete row, newline lost: kept, newline restored
    assert len(read_results(path, repair=True)) == 1 and path.read_text().endswith("\n")
    path.write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(kvtrim.KVTrimError, match="line 2 is corrupt"):
        read_results(path)


def test_a_different_configuration_is_refused(llama, tok, tmp_path):
    config = small_config(tasks=["passkey"], samples=1, methods=["knorm"])
    run_bench(llama, tok, config, tmp_path, progress=False)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["methods"] == ["knorm"]
    other = small_config(tasks=["passkey"], samples=1, methods=["knorm"], ratios=[0.0, 0.75])
    with pytest.raises(kvtrim.KVTrimError, match=r"different configuration \(ratios"):
        run_bench(llama, tok, other, tmp_path, progress=False)


def test_budget_rows_shared_equal_separate_and_old_folders_resume(llama, tok, tmp_path):
    budgets = ["uniform", "adaptive", "pyramid"]
    config = small_config(tasks=["passkey"], samples=1, methods=["knorm", "snapkv"], budgets=budgets)
    shared = run_bench(llama, tok, config, tmp_path / "shared", progress=False).rows
    alone = {
        row_key(r): r
        for r in run_bench(llama, tok, config, tmp_path / "alone", share=False, progress=False).rows
    }
    assert len(shared) == len(alone) == 1 + 2 * 3
    assert {r["budget"] for r in shared} == set(budgets)
    for row in shared:
        for name in COMPARED:
            assert row.get(name) == alone[row_key(row)].get(name), (row_key(row), name)
    adaptive = [r for r in shared if r["budget"] == "adaptive"]
    assert all(r["kv_tokens_after"] < r["kv_tokens_before"] for r in adaptive)
    # a folder written before the budget axis: no budgets in config.json, no budget in the rows
    old = tmp_path / "old"
    plain = small_config(tasks=["passkey"], samples=1, methods=["knorm"])
    rows = run_bench(llama, tok, plain, old, progress=False).rows
    stored = json.loads((old / CONFIG_FILE).read_text())
    del stored["budgets"]
    (old / CONFIG_FILE).write_text(json.dumps(stored))
    (old / RESULTS_FILE).write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "budget"}) + "\n" for r in rows)
    )
    again = run_bench(llama, tok, plain, old, progress=False)
    assert (again.written, again.skipped) == (0, 2)
    with pytest.raises(kvtrim.KVTrimError, match=r"different configuration \(budgets"):
        run_bench(
            llama, tok, small_config(tasks=["passkey"], samples=1, methods=["knorm"], budgets=budgets), old
        )


class QueryAwareKNorm(KNorm):
    query_aware = True  # pretends to need the question: cannot share the question-agnostic prefill


def test_query_aware_methods_share_a_prefill_of_their_own_with_the_question(
    reference, llama, tok, tmp_path, monkeypatch
):
    monkeypatch.setitem(METHODS, "knorm", QueryAwareKNorm)
    config = small_config(tasks=["passkey", "perplexity"], methods=["knorm", "expected-attention"])
    config.ratios = [0.0, 0.5, 0.75]
    rows = run_bench(llama, tok, config, tmp_path, progress=False).rows
    assert not any(r["method"] == "knorm" and r["task"] == "perplexity" for r in rows)  # no question
    assert len(rows) == 2 * 5 + 2 * 3
    for row in rows:
        assert row["shared_prefill"]
        # per sample: knorm's 2 cells on [context | question], the others' on the context alone
        assert row["prefill_cells"] == (2 if row["method"] == "knorm" else 3)
        ref = reference.get(row_key(row))
        if row["method"] == "knorm":  # the question was prefilled (and compressed) with the context
            alone = reference[(row["task"], row["index"], "expected-attention", 0.5, "uniform")]
            assert row["context_tokens"] > alone["context_tokens"]
            assert row["kv_tokens_before"] > alone["kv_tokens_before"]
        elif ref is not None:
            for name in COMPARED:
                assert row.get(name) == ref.get(name)


def test_snapkv_query_aware_rows_are_labelled_and_answer_as_a_manual_prefill(llama, tok, tmp_path):
    config = small_config(
        tasks=["passkey", "perplexity"], samples=1, methods=["snapkv", "snapkv-query-aware"]
    )
    config.ratios = [0.5]
    rows = run_bench(llama, tok, config, tmp_path, progress=False).rows
    labels = {(r["task"], r["method"]) for r in rows}
    assert labels == {("passkey", "snapkv"), ("passkey", "snapkv-query-aware"), ("perplexity", "snapkv")}
    row = next(r for r in rows if r["method"] == "snapkv-query-aware")
    # the reference: prefill [context | question] compressed by snapkv in one forward, decode greedily
    sample = build_samples(config, tok)["passkey"][0]
    layout = layout_for(tok, sample.context, True)
    ids = encode(tok, layout.context_text, layout.add_special_tokens)
    ids += encode(tok, layout.question_prefix + sample.question)
    cache = DynamicCache(config=llama.config)
    with kvtrim.compressing(llama, "snapkv", ratio=0.5, tokenizer=tok), torch.inference_mode():
        llama(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(len(ids))[None],
            cache=cache,
            use_cache=True,
        )
        tail = encode(tok, layout.question_suffix + sample.answer_prefix.lstrip())
        budget = min(sample.max_new_tokens, config.max_new_tokens)
        expected = greedy_decode(llama, cache, tail, len(ids), budget, stop_token_ids(llama, tok))
    assert row["context_tokens"] == len(ids)
    assert row["prediction"] == tok.decode(expected, skip_special_tokens=True).strip()
    assert row["generated_tokens"] == len(expected)


def test_answer_prefix_is_continued_after_the_prompt(llama, tok):
    session = kvtrim.compress(llama, tok, sample_text(200), method="knorm", ratio=0.5)
    plain = session.answer("q?", max_new_tokens=5)
    assert session.answer("q?", max_new_tokens=5, answer_prefix="").token_ids == plain.token_ids
    prefixed = session.answer("q?", max_new_tokens=5, answer_prefix="The key is")
    ids = encode(tok, session.layout.question_text("q?") + "The key is")
    expected = greedy_decode(llama, session.cache, ids, session.context_length, 5, stop_token_ids(llama, tok))
    assert prefixed.token_ids == expected


def test_perplexity_at_ratio_zero_is_the_models_own(llama, tok):
    config = small_config(tasks=["perplexity"], samples=1)
    sample = build_samples(config, tok)["perplexity"][0]
    session = kvtrim.compress(llama, tok, sample.context, method="none", ratio=0.0, use_chat_template=False)
    cont = continuation_ids(tok, sample)
    nll, n = continuation_nll(session, cont)
    assert n == len(cont) - 1 == 31
    context = encode(tok, session.layout.context_text, session.layout.add_special_tokens)
    with torch.inference_mode():
        logits = llama(input_ids=torch.tensor([context + cont])).logits[0]  # (T, V)
    logprobs = torch.log_softmax(logits[len(context) : -1].float(), -1)
    direct = -logprobs.gather(-1, torch.tensor(cont[1:])[:, None]).sum()
    assert math.isclose(nll, float(direct), rel_tol=1e-4)
    text = sample.metadata["continuation"]
    cells = perplexity(llama, tok, sample.context, text, ["knorm"], [0.0, 0.75], max_tokens=len(cont))
    assert math.isclose(cells[("knorm", 0.0)], math.exp(float(direct) / n), rel_tol=1e-4)
    assert cells[("knorm", 0.75)] != cells[("knorm", 0.0)]


def test_batched_runner_equals_one_by_one(llama, tok, tmp_path):
    """Samples answered in left-padded batches give the rows of one-by-one runs; cells a batch
    cannot hold (adaptive budget, query-aware method, perplexity) fall back to one by one."""
    from kvtrim.bench.tasks.sample import Sample

    config = small_config(
        tasks=["recall", "perplexity"],
        methods=["knorm", "snapkv", "snapkv-query-aware"],
        budgets=["uniform", "adaptive"],
        samples=3,
    )
    samples = {
        "recall": [
            Sample(
                "recall", sample_text(n, seed=n), "Which word?", " Answer:", ["river"], "string_match_all", 6
            )
            for n in (300, 120, 210)  # different lengths: the batch of the first two is padded
        ],
        "perplexity": build_samples(small_config(tasks=["perplexity"]), tok)["perplexity"],
    }
    single = run_bench(llama, tok, config, tmp_path / "single", progress=False, samples=samples)
    for share in (True, False):
        batched = run_bench(
            llama,
            tok,
            config,
            tmp_path / f"batched-{share}",
            progress=False,
            samples=samples,
            batch_size=2,
            share=share,
        )
        assert len(batched.rows) == len(single.rows)
        by_key = {row_key(r): r for r in single.rows}
        in_batches = [r for r in batched.rows if r.get("batch_size")]
        # the batch of two recall samples, uniform cells: none, knorm and snapkv
        assert sorted((r["index"], r["method"]) for r in in_batches) == [
            (i, m) for i in (0, 1) for m in ("knorm", "none", "snapkv")
        ]
        assert {r["budget"] for r in in_batches} == {"uniform"}
        for row in batched.rows:
            expected = by_key[row_key(row)]
            for name in COMPARED:
                assert row.get(name) == expected.get(name), (row_key(row), name)


def test_duo_budget_and_critical_method_share_the_prefill(llama, tok, tmp_path, monkeypatch):
    """A budget needing calibration (duo) and a scorer depending on the kept count (critical)
    give the same rows from the shared prefill as compressing each cell alone."""
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path / "cache"))
    config = small_config(
        tasks=["passkey"], samples=1, methods=["critical", "streaming-llm"], budgets=["uniform", "duo"]
    )
    shared = run_bench(llama, tok, config, tmp_path / "shared", progress=False).rows
    alone = {
        row_key(r): r
        for r in run_bench(llama, tok, config, tmp_path / "alone", share=False, progress=False).rows
    }
    assert len(shared) == 1 + 2 * 2
    for row in shared:
        for name in COMPARED:
            assert row.get(name) == alone[row_key(row)].get(name), (row_key(row), name)
