"""Benchmark sweeps on Ray: the same rows as a local run, faults cost nothing, runs resume across
local and Ray runs, and a separately started cluster is joined by address."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.distributed import RayOptions, ray_module, run_bench_on_ray
from kvtrim.bench.results import RESULTS_FILE, read_results, row_key
from kvtrim.bench.run import run_bench
from kvtrim.bench.samples import build_samples
from kvtrim.core.errors import KVTrimError

ray = pytest.importorskip("ray")

COMPARED = ("prediction", "score", "kv_bytes_after", "kv_tokens_after", "kv_bytes_before")
CONFIG = BenchConfig(
    tasks=["passkey", "niah_single_1"],
    methods=["knorm", "tova"],
    ratios=[0.0, 0.5],
    length=640,
    samples=2,
    max_new_tokens=6,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ray-model")
    make_model("llama", max_positions=2048).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def local(model_dir, tmp_path_factory):
    """The reference: the same plan run here, in this process."""
    import kvtrim

    model, tokenizer = kvtrim.load_model(model_dir)
    out = tmp_path_factory.mktemp("local")
    summary = run_bench(model, tokenizer, CONFIG, out, progress=False)
    samples = build_samples(CONFIG, tokenizer)
    return model, tokenizer, samples, {row_key(r): r for r in summary.rows}


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _same_rows(folder: Path, reference: dict) -> None:
    rows = read_results(folder / RESULTS_FILE)
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    assert set(keys) == set(reference), "a row is missing"
    for row in rows:
        expected = reference[row_key(row)]
        assert {f: row.get(f) for f in COMPARED} == {f: expected.get(f) for f in COMPARED}


def test_two_workers_give_exactly_the_local_rows(local, ray_instance, model_dir, tmp_path):
    _, _, samples, reference = local
    summary = run_bench_on_ray(model_dir, CONFIG, tmp_path, samples, RayOptions(workers=2), progress=False)
    assert summary.written == len(reference)
    _same_rows(tmp_path, reference)


def test_a_killed_worker_loses_and_duplicates_nothing(local, ray_instance, model_dir, tmp_path):
    _, _, samples, reference = local
    actors: list = []
    killed: list[int] = []

    def kill_one(row: dict) -> None:
        if not killed:
            _, pid = ray.get(actors[1].where.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    run_bench_on_ray(
        model_dir,
        CONFIG,
        tmp_path,
        samples,
        RayOptions(workers=2),
        progress=False,
        on_start=actors.extend,
        on_row=kill_one,
    )
    assert killed
    _same_rows(tmp_path, reference)
    assert not (tmp_path / "failures.jsonl").exists()


def test_an_interrupted_ray_run_resumes_locally_and_back(local, ray_instance, model_dir, tmp_path):
    model, tokenizer, samples, reference = local
    seen: list[dict] = []

    def interrupt(row: dict) -> None:
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench_on_ray(
            model_dir, CONFIG, tmp_path, samples, RayOptions(workers=2), progress=False, on_row=interrupt
        )
    partial = read_results(tmp_path / RESULTS_FILE)
    assert 0 < len(partial) < len(reference)
    summary = run_bench(model, tokenizer, CONFIG, tmp_path, progress=False)  # resumed here
    assert summary.skipped == len(partial)
    _same_rows(tmp_path, reference)

    back = tmp_path / "back"
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        run_bench(model, tokenizer, CONFIG, back, progress=False, on_row=interrupt)
    done = len(read_results(back / RESULTS_FILE))
    summary = run_bench_on_ray(model_dir, CONFIG, back, samples, RayOptions(workers=2), progress=False)
    assert summary.skipped == done and summary.written == len(reference) - done
    _same_rows(back, reference)


def test_a_cluster_started_apart_is_joined_by_address(local, model_dir, tmp_path):
    _, _, samples, reference = local
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray_cli is not None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        options = RayOptions(address=f"127.0.0.1:{port}", workers=2)
        run_bench_on_ray(model_dir, CONFIG, tmp_path, samples, options, progress=False)
        assert not ray.is_initialized()  # the driver left the cluster, which keeps running
        _same_rows(tmp_path, reference)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_without_ray_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(KVTrimError, match=r"pip install 'kvtrim\[ray\]'"):
        ray_module()
