"""Published data loaders, on small local files in RULER's and LongBench's own layouts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, make_tokenizer

from kvtrim.bench.config import BenchConfig
from kvtrim.bench.run import run_bench
from kvtrim.bench.samples import build_samples
from kvtrim.bench.tasks.loaders import (
    LONGBENCH,
    count_score,
    load_longbench,
    load_ruler,
    longbench_sample,
    qa_f1,
    read_rows,
    retrieval_score,
    truncate_middle,
)
from kvtrim.core.errors import KVTrimError

HAY = "The grass is green. The sky is blue. " * 6


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def prepare_py_rows(n: int) -> list[dict]:
    """RULER prepare.py output: the whole prompt in ``input``, the question on its last line."""
    return [
        {
            "index": i,
            "input": f"Some special magic numbers are hidden.\n{HAY}One magic number is {100 + i}. {HAY}\n"
            f"What is the special magic number mentioned in the provided text?",
            "outputs": [str(100 + i)],
            "length": 300,
            "answer_prefix": " The special magic number mentioned in the provided text is",
        }
        for i in range(n)
    ]


def split_rows() -> list[dict]:
    """The split layout of simonjegou/ruler."""
    return [
        {
            "context": f"Memorize the chain.\n{HAY}VAR A = 12345",
            "question": "Question: Find all variables that are assigned the value 12345.",
            "answer_prefix": " Answer: the variables are:",
            "answer": ["A"],
            "task": "vt",
            "max_new_tokens": 30,
        },
        {
            "context": f"Answer the question.\n\nDocument 1:\n{HAY}",
            "question": "Question: what colour is the sky?",
            "answer_prefix": " Answer:",
            "answer": ["blue", "Blue"],
            "task": "qa_1",
            "max_new_tokens": 32,
        },
    ]


def test_ruler_prepare_py_layout(tmp_path):
    write_jsonl(tmp_path / "niah_single_1" / "validation.jsonl", prepare_py_rows(3))
    write_jsonl(tmp_path / "vt" / "validation.jsonl", [{**split_rows()[0], "outputs": ["A"]}])
    loaded = load_ruler(tmp_path, n_samples=2)
    assert list(loaded) == ["niah_single_1", "vt"]  # RULER's task order
    sample = loaded["niah_single_1"][1]
    assert sample.question == "What is the special magic number mentioned in the provided text?"
    assert sample.context.rstrip().endswith(HAY.rstrip()) and "101" in sample.context
    assert sample.references == ["101"] and sample.metric == "string_match_all"
    assert sample.max_new_tokens == 128 and sample.answer_prefix.startswith(" The special")
    assert sample.score("It is 101.") == 100.0
    assert list(load_ruler(tmp_path, tasks=["vt"])) == ["vt"]
    with pytest.raises(KVTrimError, match="has no task"):
        load_ruler(tmp_path, tasks=["cwe"])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "save_to_disk"])
def test_ruler_split_layout(tmp_path, fmt):
    import datasets

    data = datasets.Dataset.from_list(split_rows())
    folder = tmp_path / "4096"
    folder.mkdir()
    if fmt == "parquet":
        data.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    elif fmt == "jsonl":
        write_jsonl(folder / "test.jsonl", split_rows())
    else:
        data.save_to_disk(str(folder))
    loaded = load_ruler(tmp_path, length=4096)  # picks the 4096/ sub-folder
    assert list(loaded) == ["vt", "qa_1"]
    qa = loaded["qa_1"][0]
    assert qa.metric == "string_match_part" and qa.references == ["blue", "Blue"]
    assert qa.max_new_tokens == 32 and qa.question.startswith("Question:")
    assert loaded["vt"][0].metric == "string_match_all"


def test_longbench_layout(tmp_path):
    rows = [
        {
            "input": "Which tower is in Paris?",
            "context": "Passage 1:\nThe Eiffel Tower is in Paris.",
            "answers": ["Eiffel Tower"],
            "length": 9,
            "dataset": "hotpotqa",
            "all_classes": None,
            "_id": f"id{i}",
        }
        for i in range(3)
    ]
    write_jsonl(tmp_path / "hotpotqa.jsonl", rows)
    write_jsonl(tmp_path / "passage_count.jsonl", [{**rows[0], "answers": ["3"], "input": ""}])
    loaded = load_longbench(tmp_path, ["hotpotqa"], n_samples=2)
    sample = loaded["hotpotqa"][1]
    template = LONGBENCH["hotpotqa"][0]
    assert sample.prompt() == template.format(context=rows[1]["context"], input=rows[1]["input"])
    assert sample.question.startswith("Answer the question based on the given passages.")
    assert sample.max_new_tokens == 32 and sample.metric == "qa_f1"
    assert sample.score("the eiffel tower.") == 100.0
    assert list(load_longbench(tmp_path)) == ["hotpotqa", "passage_count"]
    assert list(load_longbench(tmp_path / "hotpotqa.jsonl")) == ["hotpotqa"]
    with pytest.raises(KVTrimError, match="Unsupported LongBench subset"):
        load_longbench(tmp_path, ["gov_report"])


def test_longbench_metrics():
    assert qa_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(100 * 2 / 3)
    assert qa_f1("nothing", ["Eiffel Tower"]) == 0.0
    assert count_score("There are 3 paragraphs, not 4.", ["3"]) == 50.0
    assert retrieval_score("Paragraph 7", ["Paragraph 7"]) == 100.0
    assert retrieval_score("Paragraph 2", ["Paragraph 7"]) == 0.0


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(KVTrimError, match="not in the local Hugging Face cache"):
        read_rows("no-owner-kvtrim/no-dataset", config="4096")
    with pytest.raises(KVTrimError, match="neither an existing path"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(KVTrimError, match="holds no"):
        read_rows(tmp_path)


def test_truncate_middle_keeps_both_ends():
    tok = make_tokenizer()
    rows = [{"input": "q?", "context": "A" * 400 + "B" * 400, "answers": ["x"], "_id": "0"}]
    sample = longbench_sample(rows[0], "hotpotqa", 0)
    short = truncate_middle(tok, sample, 700)
    total = len(tok(short.prompt())["input_ids"]) + short.max_new_tokens
    assert total <= 700 and short.context.endswith("B" * 50) and "A" * 50 in short.context
    assert short.metadata["truncated_from"] > 900 and len(short.context) < 600
    assert truncate_middle(tok, sample, 10_000) is sample


def test_bench_runs_on_local_ruler_data(tmp_path):
    write_jsonl(tmp_path / "data" / "niah_single_1" / "validation.jsonl", prepare_py_rows(2))
    tok = make_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = BenchConfig(
            tasks=["ruler"],
            methods=["knorm"],
            ratios=[0.0, 0.5],
            length=1024,
            samples=2,
            dataset="ruler",
            data=str(tmp_path / "data"),
            max_new_tokens=4,
        )
        assert [s.references for s in build_samples(config, tok)["niah_single_1"]] == [["100"], ["101"]]
        summary = run_bench(make_model("llama"), tok, config, tmp_path / "out", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(summary.rows) == 4 and {r["task"] for r in summary.rows} == {"niah_single_1"}
