"""Method and budget specs (name:key=value): parsed strictly, applied exactly, kept as row labels."""

from __future__ import annotations

import pytest
from conftest import make_model, make_tokenizer

import kvtrim
from kvtrim.bench.config import BenchConfig
from kvtrim.bench.evaluate import CellEvaluator
from kvtrim.bench.run import run_bench
from kvtrim.bench.samples import build_samples
from kvtrim.budgets import make_budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import parse_named as parse_spec
from kvtrim.scorers import make_scorer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_spec_values():
    assert parse_spec("knorm") == ("knorm", {})
    name, options = parse_spec("x:a=1:b=0.5:c=true:d=none:e=snapkv:f-g=False")
    assert name == "x"
    assert options == {"a": 1, "b": 0.5, "c": True, "d": None, "e": "snapkv", "f_g": False}
    assert isinstance(options["a"], int) and isinstance(options["b"], float)
    for bad in ("x:a", "x:=1", "x:a=1:a=2"):
        with pytest.raises(KVTrimError):
            parse_spec(bad)


def test_specs_build_configured_scorers_and_budgets():
    assert make_scorer("expected-attention:epsilon=0.01").epsilon == 0.01
    assert make_scorer("expected-attention:epsilon=0.01", epsilon=0.02).epsilon == 0.02  # keywords win
    assert make_scorer("critical:base=knorm").base == "knorm"
    assert make_budget("adaptive:alpha=0.1").alpha == 0.1
    assert make_budget("pyramid:beta=5").beta == 5
    with pytest.raises(KVTrimError, match="Bad option for method"):
        make_scorer("knorm:nope=1")
    with pytest.raises(KVTrimError, match="Unknown method 'nope'"):
        make_scorer("nope:epsilon=1")
    with pytest.raises(KVTrimError, match="adaptive alpha"):
        make_budget("adaptive:alpha=2")
    with pytest.raises(KVTrimError, match="Unknown budget"):
        BenchConfig(tasks=["passkey"], methods=["knorm"], ratios=[0.5], budgets=["flat:alpha=1"])
    with pytest.raises(KVTrimError, match="adaptive alpha"):
        BenchConfig(tasks=["passkey"], methods=["knorm"], ratios=[0.5], budgets=["adaptive:alpha=2"])


@pytest.mark.parametrize("share", [True, False])
def test_bench_rows_carry_the_specs_and_equal_compressing_with_the_options(tmp_path, share):
    tok = make_tokenizer()
    model = make_model("llama", max_positions=2048)
    method, budget = "expected-attention:epsilon=0.01", "adaptive:alpha=0.5"
    config = BenchConfig(
        tasks=["passkey"],
        methods=["expected-attention", method],
        ratios=[0.5],
        budgets=[budget],
        length=640,
        samples=1,
        max_new_tokens=6,
    )
    rows = run_bench(model, tok, config, tmp_path, progress=False, share=share).rows
    assert {(r["method"], r["budget"]) for r in rows} == {("expected-attention", budget), (method, budget)}
    sample = build_samples(config, tok)["passkey"][0]
    for row in rows:
        epsilon = 0.01 if row["method"] == method else 0.0
        session = kvtrim.compress(
            model,
            tok,
            sample.context,
            "expected-attention",
            0.5,
            budget="adaptive",
            budget_options={"alpha": 0.5},
            epsilon=epsilon,
        )
        answer = session.answer(
            sample.question, max_new_tokens=6, answer_prefix=sample.answer_prefix.lstrip()
        )
        assert row["kv_tokens_after"] == session.stats.kv_tokens_after
        assert row["prediction"] == answer.text
    assert CellEvaluator(model, tok, config).scorers[method].epsilon == 0.01  # the option reaches the scorer
    by_method = {r["method"]: r for r in rows}
    assert by_method[method]["kv_tokens_after"] == by_method["expected-attention"]["kv_tokens_after"]
