"""The prepared GPU check runs end to end on the CPU with a tiny model, so it works the first
time a GPU is available: the varlen packing agrees with the per-head loop and every cell reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    report = load_script().main(["--tiny", "--lengths", "128,256", "--decode", "4", "--out", str(out)])
    assert report["varlen"]["ok"] and report["varlen"]["varlen_calls"] > 0
    assert report["varlen"]["same_tokens"]
    cells = {(row["tokens"] > 200, row["cell"]) for row in report["rows"]}
    assert {cell for _, cell in cells} == {"transformers", "none", "uniform", "adaptive", "chunked"}
    assert len(report["rows"]) == 2 * 5
    assert json.loads(out.read_text())["rows"] == report["rows"]
    kept = {row["cell"]: row["kv_bytes_after"] for row in report["rows"] if row["tokens"] > 200}
    assert kept["uniform"] < kept["none"] and kept["adaptive"] < kept["none"]
