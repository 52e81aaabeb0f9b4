"""The command line: documented exit code 2 and a one-line message for every user mistake.

Most commands run in this process (``cli_runner``); the calls marked "process" start the real
command, as a user does.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from cli_runner import run_here as run
from cli_runner import run_process
from conftest import make_model, make_tokenizer, sample_text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", max_positions=256).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def _assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_methods_lists_every_method():
    from kvtrim.scorers import METHODS
    from kvtrim.scorers.unavailable import UNAVAILABLE

    result = run_process("methods")  # process
    assert result.returncode == 0
    for name, cls in METHODS.items():
        assert name in result.stdout and cls.paper in result.stdout
    assert "Not available" in result.stdout and "--evicted" in result.stdout
    for entry in UNAVAILABLE:
        assert entry.name in result.stdout and entry.why in result.stdout
        assert entry.name not in METHODS


def test_unknown_method(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    _assert_user_error(run("ask", str(doc), "-q", "q?", "--method", "nope"), "Unknown method 'nope'")


@pytest.mark.parametrize("ratio", ["1", "-0.2", "x"])
def test_bad_ratio(tmp_path, ratio):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    _assert_user_error(run("ask", str(doc), "-q", "q?", "--ratio", ratio), "ratio")


def test_missing_and_empty_context(tmp_path, tiny_dir):
    _assert_user_error(run("ask", str(tmp_path / "none.txt"), "-q", "q?"), "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _assert_user_error(run("ask", str(empty), "-q", "q?", "--model", tiny_dir), "empty")


def test_context_too_long(tmp_path, tiny_dir):
    doc = tmp_path / "long.txt"
    doc.write_text(sample_text(400))
    _assert_user_error(run("ask", str(doc), "-q", "q?", "--model", tiny_dir), "window of 256")


def test_unknown_model(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    _assert_user_error(
        run("ask", str(doc), "-q", "q?", "--model", str(tmp_path / "missing.gguf")), "not found"
    )
    _assert_user_error(
        run("ask", str(doc), "-q", "q?", "--model", "no-org/no-model-kvtrim"), "Cannot load model"
    )


def test_ask_json_with_local_model(tmp_path, tiny_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(150))
    result = run(
        "ask",
        str(doc),
        "-q",
        "one?",
        "-q",
        "two?",
        "--model",
        tiny_dir,
        "--method",
        "knorm",
        "--ratio",
        "0.75",
        "--json",
        "--max-new-tokens",
        "4",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["answers"]) == 2
    assert report["kv_bytes_after"] < report["kv_bytes_before"]
    assert report["kv_tokens_before"] == report["context_tokens"] * 3 * 2  # layers x kv-heads
    assert set(report) >= {"kv_tokens_after", "prefill_s", "compress_s", "answer_s"}


def test_stdin_context(tiny_dir):
    result = run("ask", "-", "-q", "q?", "--model", tiny_dir, "--max-new-tokens", "2", stdin=sample_text(80))
    assert result.returncode == 0, result.stderr
    assert "KV cache" in result.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--budget", "adaptive"],
        ["--budget-tokens", "40", "--chunk", "32"],
        ["--threshold", "-1.0"],
        ["--budget", "pyramid"],
        ["--budget", "adaptive:alpha=0.5"],
    ],
)
def test_budget_flags(tmp_path, tiny_dir, flags):
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(150))
    result = run(
        "ask",
        str(doc),
        "-q",
        "q?",
        "--model",
        tiny_dir,
        "--method",
        "knorm",
        "--json",
        "--max-new-tokens",
        "2",
        *flags,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    if "--budget-tokens" in flags:
        assert report["kv_tokens_after"] == 40 * 3 * 2  # tokens x layers x kv-heads


def test_budget_flag_errors(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    _assert_user_error(run("ask", str(doc), "-q", "q?", "--budget", "tokens"), "--budget-tokens")
    _assert_user_error(
        run("ask", str(doc), "-q", "q?", "--budget", "adaptive", "--threshold", "1"), "--threshold"
    )
    _assert_user_error(run("ask", str(doc), "-q", "q?", "--budget", "flat"), "Unknown budget 'flat'")
    _assert_user_error(run("ask", str(doc), "-q", "q?", "--budget", "adaptive:beta=2"), "Bad option")


def test_decode_budget_flags(tmp_path, tiny_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(150))
    args = ["ask", str(doc), "-q", "q?", "--model", tiny_dir, "--method", "knorm", "--json"]
    result = run(*args, "--max-new-tokens", "12", "--decode-budget", "60", "--evict-every", "8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["decode_budget"] == 60
    assert report["decode_evictions"] > 0
    _assert_user_error(run(*args, "--decode-budget", "8", "--evict-every", "9"), "evict_every")
    _assert_user_error(
        run(*args, "--method", "snapkv", "--decode-budget", "60"), "cannot evict while decoding"
    )


def test_ask_query_aware_compresses_each_question(tmp_path, tiny_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(120))
    args = ["ask", str(doc), "-q", "one?", "-q", "second question?", "--model", tiny_dir]
    result = run(*args, "--method", "snapkv-query-aware", "--ratio", "0.5", "--json", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["query_aware"] and report["method"] == "snapkv-query-aware"
    assert [a["question"] for a in report["answers"]] == ["one?", "second question?"]
    plain = json.loads(run(*args, "--method", "snapkv", "--json", "--max-new-tokens", "3").stdout)
    assert not plain["query_aware"]
    # the last question's tokens were prefilled (and compressed) with the context
    assert report["context_tokens"] > plain["context_tokens"]
    _assert_user_error(run("demo", "--method", "snapkv-query-aware"), "kvtrim ask")


def test_ask_saves_a_session_and_answers_from_it_alike(tmp_path, tiny_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(150))
    saved = tmp_path / "saved"
    common = ["-q", "which?", "--model", tiny_dir, "--max-new-tokens", "6", "--json"]
    first = run("ask", str(doc), "--method", "knorm", "--budget", "adaptive", "--save", str(saved), *common)
    assert first.returncode == 0, first.stderr
    again = run_process("ask", "--load", str(saved), *common)  # process: loaded by another one
    assert again.returncode == 0, again.stderr
    before, after = json.loads(first.stdout), json.loads(again.stdout)
    assert after["answers"] == before["answers"] and after["spec"] == before["spec"]
    assert after["kv_bytes_after"] == before["kv_bytes_after"] and after["compress_s"] == 0.0
    (saved / "cache.safetensors").write_bytes(b"not a tensor file")
    _assert_user_error(run("ask", "--load", str(saved), *common), "checksum")
    _assert_user_error(run("ask", "-q", "which?"), "--load DIR")


def test_the_demo_shows_the_default_next_to_the_seed_methods_best_configurations():
    from kvtrim.cli.demo import SEED_BEST, _showcase
    from kvtrim.core.spec import CompressionSpec

    default = CompressionSpec.default()
    shown = _showcase(default, None)
    assert shown[0] == default and len(shown) == len(set(shown))
    assert {s.method for s in shown} >= {"knorm", "expected-attention", "qfilters"}
    assert {str(s) for s in shown[1:]} <= set(SEED_BEST)
    assert all(s.ratio == 0.75 for s in _showcase(CompressionSpec.default(0.75), 0.75))


def test_methods_json_lists_every_method_and_budget_with_options():
    from kvtrim.budgets import BUDGETS
    from kvtrim.core.spec import DEFAULT_SPEC
    from kvtrim.scorers import SCORERS

    result = run("methods", "--json")
    assert result.returncode == 0
    listing = json.loads(result.stdout)
    assert listing["default"] == DEFAULT_SPEC
    assert [m["name"] for m in listing["methods"]] == list(SCORERS)
    assert [b["name"] for b in listing["budgets"]] == list(BUDGETS)
    ea = next(m for m in listing["methods"] if m["name"] == "expected-attention")
    assert ea["options"]["epsilon"] == 0.0 and ea["paper"].startswith("arXiv")
    assert listing["evicted"] == ["drop", "merge", "cam"]
    assert {u["name"] for u in listing["unavailable"]} == {"restorekv", "dms"}
