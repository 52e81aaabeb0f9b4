"""The prepared GPU check runs end to end on the CPU with a tiny model, so it works the first
time a GPU is available: the varlen packing agrees with the per-head loop and every cell reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when the script runs: its siblings import
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_the_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    check = load_script(monkeypatch)
    report = check.main(["--tiny", "--lengths", "128,256", "--decode", "4", "--out", str(out)])
    assert report["varlen"]["ok"] and report["varlen"]["varlen_calls"] > 0
    assert report["varlen"]["same_tokens"]
    cells = {(row["tokens"] > 200, row["cell"]) for row in report["rows"]}
    assert {cell for _, cell in cells} == {"transformers", "none", "uniform", "adaptive", "chunked"}
    assert len(report["rows"]) == 2 * 5
    assert json.loads(out.read_text())["rows"] == report["rows"]
    kept = {row["cell"]: row["kv_bytes_after"] for row in report["rows"] if row["tokens"] > 200}
    assert kept["uniform"] < kept["none"] and kept["adaptive"] < kept["none"]
    scoring = {row["method"]: row for row in report["scoring"]}
    assert [row for row in report["scoring"] if "error" in row] == []
    assert {"knorm", "snapkv", "expected-attention", "critical", "kvzip"} <= set(scoring)
    assert [row["method"] for row in report["scoring"]] == [*check.scoring_methods(), "kvzip"]
    for method, row in scoring.items():
        assert row["tokens"] > 200 and row["prefill_s"] > 0, method
        assert row["kept_vs_target"] == pytest.approx(1.0, abs=0.02), method
        assert 0 < row["score_s"] <= row["compress_s"] or method == "none", method
