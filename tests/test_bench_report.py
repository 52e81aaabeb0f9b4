"""Reports: the markdown tables' numbers, the plots, the comparison of two folders, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from cli_runner import exit_code, run_process
from conftest import make_model, make_tokenizer

from kvtrim.bench.plots import plot_accuracy, plot_needle_grid
from kvtrim.bench.report import write_report
from kvtrim.bench.results import RESULTS_FILE
from kvtrim.bench.tables import (
    accuracy_table,
    average_by_cell,
    comparison_markdown,
    cost_table,
    ordered_cells,
    perplexity_by_cell,
    summary_markdown,
)
from kvtrim.core.errors import KVTrimError

PNG = b"\x89PNG\r\n\x1a\n"


def row(task, index, method, ratio, score=None, **extra):
    base = dict(
        task=task,
        index=index,
        method=method,
        ratio=ratio,
        score=score,
        prediction=f"{score}",
        kv_bytes_before=1000,
        kv_bytes_after=int(1000 * (1 - ratio)),
        prefill_s=1.0,
        score_s=0.01,
        eval_s=0.5,
        cell_s=0.6,
        length=100,
        metadata={},
    )
    return {**base, **extra}


def synthetic_rows() -> list[dict]:
    rows = []
    for i in range(2):
        rows.append(
            row("niah_single_1", i, "none", 0.0, 100.0, metadata={"depth": 0.1 + 0.5 * i, "length": 100})
        )
        rows.append(
            row("niah_single_1", i, "knorm", 0.5, 50.0 * i, metadata={"depth": 0.1 + 0.5 * i, "length": 100})
        )
        rows.append(
            row("niah_single_1", i, "knorm", 0.25, 100.0, metadata={"depth": 0.1 + 0.5 * i, "length": 100})
        )
    for i in range(4):  # a bigger task must not weigh more in the average
        rows.append(row("vt", i, "none", 0.0, 80.0))
        rows.append(row("vt", i, "knorm", 0.5, 0.0))
        rows.append(row("vt", i, "knorm", 0.25, 40.0))
    for i, nll in enumerate((10.0, 30.0)):
        for method, ratio, extra in (("none", 0.0, 0.0), ("knorm", 0.5, 8.0)):
            rows.append(row("perplexity", i, method, ratio, None, nll=nll + extra, n_tokens=10))
    return rows


def test_accuracy_table_and_macro_average():
    rows = synthetic_rows()
    assert ordered_cells(rows) == [("none", 0.0), ("knorm", 0.25), ("knorm", 0.5)]
    table = accuracy_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| task | n | none | knorm 0.25 | knorm 0.5 |"
    assert lines[2] == "| niah_single_1 | 2 | 100.0 | 100.0 | 25.0 |"
    assert lines[3] == "| vt | 4 | 80.0 | 40.0 | 0.0 |"
    assert lines[4] == "| **average** |  | 90.0 | 70.0 | 12.5 |"
    assert average_by_cell(rows)[("knorm", 0.5)] == 12.5


def test_perplexity_and_cost():
    ppl = perplexity_by_cell(synthetic_rows())
    assert math.isclose(ppl[("none", 0.0)], math.exp(40 / 20))
    assert math.isclose(ppl[("knorm", 0.5)], math.exp(56 / 20))
    cost = cost_table(synthetic_rows())
    assert "| knorm 0.5 | 8 | 50.0 |" in cost
    text = summary_markdown(synthetic_rows())
    assert "perplexity ↓" in text and "**average**" in text


def test_comparison_of_two_runs():
    a = synthetic_rows()
    b = [dict(r) for r in a]
    b[1] = {**b[1], "score": 100.0, "prediction": "changed"}  # niah_single_1 #0 knorm 0.5
    b.append(row("vt", 9, "none", 0.0, 0.0))  # only in B: left out
    text = comparison_markdown(a, b, "A", "B")
    assert "1 only in B" in text
    assert "| niah_single_1 | 100.0 → 100.0 (+0.0) | 100.0 → 100.0 (+0.0) | 25.0 → 75.0 (+50.0) |" in text
    assert "Predictions that differ: 1 of 18." in text
    with pytest.raises(KVTrimError, match="share no"):
        comparison_markdown(a, [row("x", 0, "none", 0.0, 1.0)], "A", "B")


def test_plots_are_written(tmp_path):
    paths = plot_accuracy(synthetic_rows(), tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_ratio.png", "accuracy_vs_ratio_knorm.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    heat = plot_needle_grid(synthetic_rows(), tmp_path / "niah.png")  # from niah_single depths
    assert heat is not None and heat.read_bytes().startswith(PNG)
    grid = [
        row("needle_grid", i, m, r, 100.0 * (d < 0.5), metadata={"length": n, "target_depth": d})
        for i, (n, d) in enumerate((n, d) for n in (100, 200) for d in (0.0, 0.5, 1.0))
        for m, r in (("none", 0.0), ("knorm", 0.5))
    ]
    assert plot_needle_grid(grid, tmp_path / "grid.png").read_bytes().startswith(PNG)
    assert plot_needle_grid([row("vt", 0, "none", 0.0, 1.0)], tmp_path / "none.png") is None


def test_write_report(tmp_path):
    (tmp_path / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    markdown, files = write_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == markdown
    assert {f.name for f in files} >= {"report.md", "accuracy_vs_ratio.png", "needle_grid.png"}
    assert "perplexity_vs_ratio.png" in markdown
    with pytest.raises(KVTrimError, match="no results.jsonl"):
        write_report(tmp_path / "missing")


# --- the command line, end to end on a tiny local model ------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_process(*args, env={"OMP_NUM_THREADS": "1"})  # tiny model: one thread is fastest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", max_positions=1024).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def main(*args: str) -> int:
    """The CLI in this process (faster than a subprocess), on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return exit_code(*args)
    finally:
        torch.set_num_threads(threads)


def test_bench_and_report_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["bench", "--model", tiny_dir, "--tasks", "passkey", "--length", "400", "--samples", "2"]
    args += ["--methods", "knorm,streaming-llm", "--ratios", "0,0.5", "--max-new-tokens", "4", "--quiet"]
    first = cli(*args, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "| passkey | 2 |" in first.stdout and "**average**" in first.stdout
    assert len((out / RESULTS_FILE).read_text().splitlines()) == 2 * 3
    again = cli(*args, "--out", str(out))  # resume: nothing left to do
    assert again.returncode == 0 and "0 new rows, 6 already done" in again.stderr
    assert main(*[a if a != "0,0.5" else "0,0.75" for a in args], "--out", str(out)) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main("report", str(out)) == 0
    assert (out / "report.md").is_file() and (out / "accuracy_vs_ratio_knorm.png").is_file()
    separate = tmp_path / "separate"
    assert main(*args, "--no-share", "--out", str(separate)) == 0
    capsys.readouterr()
    assert main("report", str(out), str(separate)) == 0
    assert "Predictions that differ: 0 of 6." in capsys.readouterr().out


def test_bench_cli_user_errors(tmp_path, capsys):
    assert main("bench", "--tasks", "nope", "--out", str(tmp_path / "x")) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main("bench", "--tasks", "vt", "--methods", "nope", "--out", str(tmp_path / "x")) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
    assert main("bench", "--ratios", "0,1.5", "--out", str(tmp_path / "x")) == 2
    assert "ratio" in capsys.readouterr().err
    assert main("report", str(tmp_path / "nothing")) == 2
    assert "no results.jsonl" in capsys.readouterr().err
    assert main("bench", "--tasks", "vt", "--budgets", "uniform,tokens", "--out", str(tmp_path / "x")) == 2
    assert "ignores the ratio" in capsys.readouterr().err
    assert main("bench", "--tasks", "vt", "--budgets", "nope", "--out", str(tmp_path / "x")) == 2
    assert "Unknown budget 'nope'" in capsys.readouterr().err


def test_bench_cli_budgets_and_query_aware(tiny_dir, tmp_path, capsys):
    out = tmp_path / "budgets"
    args = [
        "bench",
        "--model",
        tiny_dir,
        "--tasks",
        "passkey",
        "--length",
        "300",
        "--samples",
        "1",
        "--quiet",
    ]
    args += ["--methods", "snapkv,snapkv-query-aware", "--budgets", "uniform,adaptive", "--ratios", "0,0.5"]
    assert main(*args, "--max-new-tokens", "3", "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    cells = {(r["method"], r["ratio"], r["budget"], r["shared_prefill"]) for r in rows}
    assert cells == {
        ("none", 0.0, "uniform", True),
        ("snapkv", 0.5, "uniform", True),
        ("snapkv", 0.5, "adaptive", True),
        ("snapkv-query-aware", 0.5, "uniform", True),  # a prefill of their own, question included
        ("snapkv-query-aware", 0.5, "adaptive", True),
    }
    assert {r["prefill_cells"] for r in rows if r["method"] == "snapkv-query-aware"} == {2}
    assert json.loads((out / "config.json").read_text())["budgets"] == ["uniform", "adaptive"]
    header = "| task | n | none | snapkv 0.5 | snapkv+adaptive 0.5 | snapkv-query-aware 0.5 | "
    assert header + "snapkv-query-aware+adaptive 0.5 |" in stdout
    assert main("report", str(out)) == 0
    assert (out / "accuracy_vs_ratio_snapkv-query-aware-adaptive.png").read_bytes().startswith(PNG)


def test_budgets_are_their_own_series_and_old_rows_are_uniform(tmp_path):
    rows = synthetic_rows()  # no budget field: uniform
    for i in range(4):
        rows.append(row("vt", i, "knorm", 0.5, 60.0, budget="adaptive"))
        rows.append(row("vt", i, "knorm", 0.5, 20.0, budget="pyramid"))
        rows.append(row("vt", i, "knorm", 0.25, 40.0, budget="uniform"))  # same cell as the old rows
    assert ordered_cells(rows) == [
        ("none", 0.0),
        ("knorm", 0.25),
        ("knorm", 0.5),
        ("knorm+adaptive", 0.5),
        ("knorm+pyramid", 0.5),
    ]
    lines = accuracy_table(rows).splitlines()
    assert lines[0] == "| task | n | none | knorm 0.25 | knorm 0.5 | knorm+adaptive 0.5 | knorm+pyramid 0.5 |"
    assert lines[3] == "| vt | 4 | 80.0 | 40.0 | 0.0 | 60.0 | 20.0 |"
    assert "| knorm+adaptive 0.5 | 4 |" in cost_table(rows)
    paths = plot_accuracy(rows, tmp_path)
    assert [p.name for p in paths] == [
        "accuracy_vs_ratio.png",
        "accuracy_vs_ratio_knorm.png",
        "accuracy_vs_ratio_knorm-adaptive.png",
        "accuracy_vs_ratio_knorm-pyramid.png",
    ]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    # a comparison matches rows on their budget too
    changed = [dict(r, score=0.0, prediction="x") if r.get("budget") == "adaptive" else r for r in rows]
    text = comparison_markdown(rows, changed, "A", "B")
    assert "60.0 → 0.0 (-60.0)" in text and "20.0 → 20.0 (+0.0)" in text
