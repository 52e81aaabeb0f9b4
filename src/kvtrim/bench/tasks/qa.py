"""RULER qa_1 (SQuAD) and qa_2 (HotpotQA): the gold paragraph(s) among distractor paragraphs.

The data sets are not bundled; the user passes the official dev files (SQuAD v2.0 ``dev-v2.0.json``,
HotpotQA ``hotpot_dev_distractor_v1.json``). The haystack size is the number of documents.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvtrim.bench.tasks.sample import Builder, Sample, generate_fitted
from kvtrim.core.errors import KVTrimError

QA_INSTRUCTION = (
    "Answer the question based on the given documents. "
    "Only give me the answer and do not output any other words."
)
QA_DATASETS = {
    "qa_1": "SQuAD v2.0 dev (dev-v2.0.json)",
    "qa_2": "HotpotQA dev distractor (hotpot_dev_distractor_v1.json)",
}


@dataclass(frozen=True)
class QaItem:
    question: str
    answers: tuple[str, ...]  # alternative gold answers (string_match_part: any one scores)
    gold: tuple[int, ...]  # indices into QaData.docs that always go in the context
    related: tuple[int, ...] = ()  # preferred distractors (SQuAD: same article's paragraphs)


@dataclass(frozen=True)
class QaData:
    items: tuple[QaItem, ...]
    docs: tuple[str, ...]  # unique documents, sorted (RULER's order)


def _read_json(path: str | Path, task: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise KVTrimError(f"{task} needs the {QA_DATASETS[task]} file; {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KVTrimError(f"{path} is not valid JSON ({err}); {task} needs {QA_DATASETS[task]}.") from err


def load_squad(path: str | Path) -> QaData:
    """SQuAD layout: {"data": [{"paragraphs": [{"context", "qas": [{"question", "answers":
    [{"text"}], "is_impossible"}]}]}]}; unanswerable questions are dropped, as in RULER."""
    raw = _read_json(path, "qa_1")
    try:
        articles = raw["data"]
        docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
        index = {d: i for i, d in enumerate(docs)}
        items = []
        for article in articles:
            same = [index[p["context"]] for p in article["paragraphs"]]
            for p in article["paragraphs"]:
                gold = index[p["context"]]
                for qa in p["qas"]:
                    answers = tuple(a["text"] for a in qa["answers"])
                    if qa.get("is_impossible", False) or not answers:
                        continue
                    related = tuple(i for i in same if i != gold)
                    items.append(QaItem(qa["question"], answers, (gold,), related))
    except (KeyError, TypeError) as err:
        raise KVTrimError(
            f"{path} does not have the SQuAD layout (missing {err}); qa_1 needs dev-v2.0.json."
        ) from err
    return QaData(tuple(items), tuple(docs))


def load_hotpotqa(path: str | Path) -> QaData:
    """HotpotQA layout: [{"question", "answer", "context": [[title, [sentence, ...]], ...]}]; a
    question's own 10 paragraphs (2 gold + 8 distractors) always go in, as in RULER."""
    raw = _read_json(path, "qa_2")
    try:

        def doc(title: str, sentences: list[str]) -> str:
            return f"{title}\n{''.join(sentences)}"

        docs = sorted({doc(t, s) for q in raw for t, s in q["context"]})
        index = {d: i for i, d in enumerate(docs)}
        items = tuple(
            QaItem(
                q["question"], (q["answer"],), tuple(dict.fromkeys(index[doc(t, s)] for t, s in q["context"]))
            )
            for q in raw
        )
    except (KeyError, TypeError, ValueError) as err:
        raise KVTrimError(
            f"{path} does not have the HotpotQA layout ({err!r}); qa_2 needs hotpot_dev_distractor_v1.json."
        ) from err
    return QaData(items, tuple(docs))


@lru_cache(maxsize=4)
def load_qa(task: str, path: str) -> QaData:
    """The data of ``task`` ("qa_1" or "qa_2"), parsed once per file."""
    data = load_squad(path) if task == "qa_1" else load_hotpotqa(path)
    if not data.items:
        raise KVTrimError(f"{path} holds no answerable question; {task} needs {QA_DATASETS[task]}.")
    return data


def qa_builder(task: str, data: QaData, item: QaItem) -> Builder:
    """Size unit: documents; the gold ones, then related ones, then random others, shuffled."""

    def build(rng: random.Random, n: int) -> Sample:
        related = list(item.related)
        rng.shuffle(related)
        chosen = list(item.gold) + related[: max(0, n - len(item.gold))]
        seen = set(item.gold) | set(item.related)
        extra = random.Random(rng.getrandbits(64))  # same prefix of extra documents whatever n is
        while len(chosen) < min(n, len(data.docs)):
            j = extra.randrange(len(data.docs))
            if j not in seen:
                seen.add(j)
                chosen.append(j)
        rng.shuffle(chosen)
        documents = "\n\n".join(f"Document {i + 1}:\n{data.docs[j]}" for i, j in enumerate(chosen))
        return Sample(
            task=task,
            context=f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{documents}",
            question=f"{QA_INSTRUCTION}\n\nQuestion: {item.question}",
            answer_prefix=" Answer:",
            references=list(item.answers),
            metric="string_match_part",
            max_new_tokens=32,
            separator="\n\n",
            metadata={"n_docs": len(chosen), "gold_docs": [chosen.index(g) + 1 for g in item.gold]},
        )

    return build


def generate_qa(
    task: str,
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int,
    data_file: str | Path | None,
    extra_tokens: int = 0,
) -> list[Sample]:
    """Distinct questions per call (a seeded permutation, cycled only past the data set's size)."""
    if data_file is None:
        raise KVTrimError(
            f"{task} needs the {QA_DATASETS[task]} file, which kvtrim does not bundle; "
            f"pass it as data_file (or leave {task} out of the task list)."
        )
    data = load_qa(task, str(data_file))
    order = list(range(len(data.items)))
    random.Random(f"kvtrim:{task}:{seed}:questions").shuffle(order)
    samples: list[Sample] = []
    hint = None
    for i in range(n_samples):
        build = qa_builder(task, data, data.items[order[i % len(order)]])
        samples += generate_fitted(
            task, tokenizer, length, 1, seed, build, 1, len(data.docs), extra_tokens, first_index=i, hint=hint
        )
        hint = samples[-1].metadata["size"]
    return samples
