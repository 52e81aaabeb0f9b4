"""Published benchmark data (RULER, LongBench) as :class:`Sample` s, from a local path or the HF cache.

Why samples: once a published row is split into the compressed ``context`` and the never-compressed
``question``, the runner, resume logic and reports treat it exactly like a generated task.

Layouts read (via ``datasets``, never downloading anything):

- RULER, as written by RULER's ``prepare.py``: a folder with ``{task}/validation.jsonl`` rows
  ``{"index", "input", "outputs", "length", "answer_prefix"?}``; ``input`` is the whole prompt
  (prepare it with the plain ``base`` template) and its last line is taken as the question.
- RULER, split (the layout of the hub data set ``simonjegou/ruler``, one config per length): rows
  ``{"context", "question", "answer_prefix", "answer": [...], "task", "max_new_tokens"}`` in a
  .jsonl / .json / .parquet file, a folder of them (``{length}/`` sub-folder picked when present),
  or a folder written by ``Dataset.save_to_disk``.
- LongBench (``THUDM/LongBench``, ``data.zip``): ``{subset}.jsonl`` rows ``{"input", "context",
  "answers", "length", "dataset", "all_classes", "_id"}``, rendered with LongBench's own prompt of
  each subset, cut at ``{context}``. Scored with LongBench's metrics (token F1, count, retrieval),
  which this module registers in :data:`kvtrim.bench.metrics.METRICS`.

A source that is not an existing path is a hub id, read from the local Hugging Face cache only.
"""

from __future__ import annotations

import contextlib
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtrim.bench.tasks.metrics import METRICS
from kvtrim.bench.tasks.registry import RULER_TASKS
from kvtrim.bench.tasks.sample import Sample, count_tokens
from kvtrim.core.errors import KVTrimError

RULER_HUB_ID = "simonjegou/ruler"
LONGBENCH_HUB_ID = "THUDM/LongBench"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# RULER's tokens_to_generate per task family (constants.py)
RULER_MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


# --- LongBench metrics ------------------------------------------------------------------------


def _normalize_answer(text: str) -> str:
    """SQuAD / LongBench normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, references: Sequence[str]) -> float:
    """Best token F1 against any reference, in [0, 100] (LongBench's ``qa_f1_score``)."""
    pred = _normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = _normalize_answer(ref).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return 100.0 * best


def count_score(prediction: str, references: Sequence[str]) -> float:
    """Share of the numbers in the prediction equal to the count (LongBench ``count_score``)."""
    numbers = re.findall(r"\d+", prediction)
    best = 0.0
    for ref in references:
        if numbers:
            best = max(best, sum(n == str(ref) for n in numbers) / len(numbers))
    return 100.0 * best


def retrieval_score(prediction: str, references: Sequence[str]) -> float:
    """Share of the numbers in the prediction naming the right paragraph (LongBench)."""
    numbers = re.findall(r"\d+", prediction)
    best = 0.0
    for ref in references:
        found = re.findall(r"Paragraph (\d+)", ref)
        if found and numbers:
            best = max(best, sum(n == found[0] for n in numbers) / len(numbers))
    return 100.0 * best


METRICS.setdefault("qa_f1", qa_f1)
METRICS.setdefault("count_score", count_score)
METRICS.setdefault("retrieval_score", retrieval_score)

# LongBench's prompt per English subset ({context} is compressed; the rest is the question),
# its answer budget (dataset2maxlen) and its metric. Summaries (rouge) and code (edit similarity)
# need metrics kvtrim does not ship, so they are left out.
_LB_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
    "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
    "Answer:"
)
_LB_CONCISE = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
    'answered based on the information in the article, write "unanswerable". If the question is a '
    'yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
LONGBENCH: dict[str, tuple[str, int, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer "
        "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
        "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": (
        f"You are given a scientific article and a question. Answer the question {_LB_CONCISE}\n\n"
        "Article: {context}\n\n Answer the question based on the above article "
        f"{_LB_CONCISE}\n\nQuestion: {{input}}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "hotpotqa": (_LB_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": (_LB_QA_PASSAGES, 32, "qa_f1"),
    "musique": (_LB_QA_PASSAGES, 32, "qa_f1"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after "
        "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
        "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
        "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
        "is: ",
        32,
        "count_score",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter "
        'the number of the paragraph that the abstract is from. The answer format must be like "Paragraph '
        '1", "Paragraph 2", etc.\n\nThe answer is: ',
        32,
        "retrieval_score",
    ),
}


# --- reading rows ------------------------------------------------------------------------------


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise KVTrimError(
            "Reading published data sets needs the `datasets` package: pip install 'kvtrim[datasets]'."
        ) from err
    return datasets


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access off while ``datasets`` resolves a name: the HF cache is read, nothing is fetched."""
    import huggingface_hub.constants as hub_constants

    datasets = _datasets()

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _read_files(files: Sequence[Path]) -> list[dict[str, Any]]:
    datasets = _datasets()

    kinds = {"parquet" if f.suffix == ".parquet" else "json" for f in files}
    if len(kinds) != 1:
        raise KVTrimError(f"Mixed file types in {[str(f) for f in files]}; keep one format per folder.")
    try:
        data = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as err:  # noqa: BLE001 - any parsing failure becomes one clear message
        raise KVTrimError(f"Cannot read {[str(f) for f in files]}: {type(err).__name__}: {err}") from err
    return list(data)


def read_rows(source: str | Path, config: str | None = None, split: str = "test") -> list[dict[str, Any]]:
    """Rows of a data set: a local .jsonl / .json / .parquet file, a folder of them, a folder written
    by ``save_to_disk``, or a hub id (with ``config``) taken from the local Hugging Face cache."""
    datasets = _datasets()

    path = Path(source)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise KVTrimError(f"{path}: expected a {', '.join(DATA_SUFFIXES)} file.")
        return _read_files([path])
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split] if split in loaded else next(iter(loaded.values()))
            return list(loaded)
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES)
        if not files:
            raise KVTrimError(f"{path} holds no {', '.join(DATA_SUFFIXES)} file.")
        return _read_files(files)
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise KVTrimError(f"Data not found: {source} is neither an existing path nor a hub id (owner/name).")
    try:
        with _offline():
            return list(datasets.load_dataset(str(source), config, split=split))
    except Exception as err:  # noqa: BLE001
        raise KVTrimError(
            f"{source} ({config or 'default'} config) is not in the local Hugging Face cache "
            f"({type(err).__name__}); kvtrim never downloads at run time. Fetch it once with "
            f"`datasets.load_dataset({str(source)!r}, {config!r})` on a connected machine, or pass a "
            "local path."
        ) from err


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _take(items: list[Sample], n_samples: int | None) -> list[Sample]:
    return items if n_samples is None else items[:n_samples]


def _order(tasks: Iterable[str], known: Sequence[str]) -> list[str]:
    found = list(dict.fromkeys(tasks))
    return [t for t in known if t in found] + [t for t in found if t not in known]


def _select(available: list[str], tasks: Sequence[str] | None, group: str, source: Any) -> list[str]:
    if tasks is None or list(tasks) == [group]:
        return available
    missing = [t for t in tasks if t not in available]
    if missing:
        raise KVTrimError(f"{source} has no task {missing}; it holds: {', '.join(available)}.")
    return list(tasks)


# --- RULER -----------------------------------------------------------------------------------


def ruler_metric(task: str) -> str:
    return "string_match_part" if task.startswith("qa") else "string_match_all"


def ruler_max_new_tokens(task: str) -> int:
    family = task.split("_")[0]
    return RULER_MAX_NEW_TOKENS.get(family, 128)


def split_last_line(prompt: str) -> tuple[str, str]:
    """(everything before the prompt's last non-empty line, that line): RULER's templates end with
    the question on its own line."""
    body = prompt.rstrip()
    cut = body.rfind("\n")
    if cut < 0:
        raise KVTrimError("A RULER input holds one line only; cannot split it into context and question.")
    return body[:cut], body[cut + 1 :].strip()


def ruler_sample(row: dict[str, Any], task: str, position: int) -> Sample:
    """One RULER row (split layout or prepare.py layout) as a :class:`Sample`."""
    if "context" in row and "question" in row:
        context, question = str(row["context"]), str(row["question"])
    elif "input" in row:
        context, question = split_last_line(str(row["input"]))
    else:
        raise KVTrimError(f"RULER row of {task} has neither context/question nor input: {sorted(row)}")
    references = _strings(row.get("answer", row.get("outputs")))
    if not references:
        raise KVTrimError(f"RULER row {position} of {task} has no answer/outputs.")
    return Sample(
        task=task,
        context=context,
        question=question,
        answer_prefix=str(row.get("answer_prefix") or ""),
        references=references,
        metric=ruler_metric(task),
        max_new_tokens=int(row.get("max_new_tokens") or ruler_max_new_tokens(task)),
        metadata={"length": row.get("length"), "source_index": row.get("index", position)},
    )


def load_ruler(
    source: str | Path = RULER_HUB_ID,
    tasks: Sequence[str] | None = None,
    n_samples: int | None = None,
    length: int | None = None,
) -> dict[str, list[Sample]]:
    """RULER samples per task (the first ``n_samples`` of each), in RULER's task order.

    ``tasks``: names, or None / ["ruler"] for all in the data; ``length`` picks the hub config
    (``"4096"``) or a ``{length}/`` sub-folder of a local copy.
    """
    path = Path(source)
    by_task: dict[str, list[dict[str, Any]]] = {}
    if path.is_dir() and any(path.glob("*/validation.jsonl")):
        for file in sorted(path.glob("*/validation.jsonl")):
            by_task[file.parent.name] = read_rows(file)
    else:
        if length is not None and path.is_dir() and (path / str(length)).is_dir():
            path = path / str(length)
        rows = read_rows(path if path.exists() else source, config=None if length is None else str(length))
        for row in rows:
            if "task" not in row:
                raise KVTrimError(f"{source}: rows need a 'task' column (RULER split layout).")
            by_task.setdefault(str(row["task"]), []).append(row)
    chosen = _select(_order(by_task, RULER_TASKS), tasks, "ruler", source)
    return {
        task: _take([ruler_sample(r, task, i) for i, r in enumerate(by_task[task])], n_samples)
        for task in chosen
    }


# --- LongBench ---------------------------------------------------------------------------------


def longbench_sample(row: dict[str, Any], subset: str, position: int) -> Sample:
    template, max_new_tokens, metric = LONGBENCH[subset]
    head, tail = template.split("{context}")
    question = tail.replace("{input}", str(row.get("input") or "")).lstrip("\n")
    separator = tail[: len(tail) - len(tail.lstrip("\n"))] or "\n"
    references = _strings(row.get("answers"))
    if not references:
        raise KVTrimError(f"LongBench row {position} of {subset} has no answers.")
    return Sample(
        task=subset,
        context=head + str(row["context"]),
        question=question,
        answer_prefix="",
        references=references,
        metric=metric,
        max_new_tokens=max_new_tokens,
        separator=separator,
        metadata={"source_index": row.get("_id", position), "length_words": row.get("length")},
    )


def load_longbench(
    source: str | Path = LONGBENCH_HUB_ID, subsets: Sequence[str] | None = None, n_samples: int | None = None
) -> dict[str, list[Sample]]:
    """LongBench samples per subset: a folder of ``{subset}.jsonl`` (LongBench's ``data.zip``), one
    such file, or the hub id from the HF cache. ``subsets``: names, or None / ["longbench"] for all
    the supported ones present."""
    path = Path(source)
    wanted = None if subsets is None or list(subsets) == ["longbench"] else list(subsets)
    unknown = [s for s in wanted or [] if s not in LONGBENCH]
    if unknown:
        raise KVTrimError(f"Unsupported LongBench subset {unknown}; supported: {', '.join(LONGBENCH)}.")
    rows: dict[str, list[dict[str, Any]]] = {}
    if path.is_file():
        subset = path.stem
        for row in read_rows(path):
            rows.setdefault(str(row.get("dataset") or subset).removesuffix("_e"), []).append(row)
    elif path.is_dir():
        for subset in wanted or LONGBENCH:
            file = path / f"{subset}.jsonl"
            if file.is_file():
                rows[subset] = read_rows(file)
    else:
        for subset in wanted or LONGBENCH:
            rows[subset] = read_rows(source, config=subset)
    available = [s for s in LONGBENCH if s in rows]
    if not available:
        raise KVTrimError(f"{source} holds none of the supported LongBench subsets ({', '.join(LONGBENCH)}).")
    chosen = _select(available, wanted, "longbench", source)
    return {s: _take([longbench_sample(r, s, i) for i, r in enumerate(rows[s])], n_samples) for s in chosen}


def truncate_middle(tokenizer: Any, sample: Sample, budget: int, extra_tokens: int = 0) -> Sample:
    """Cut the middle of the context so prompt + answer reserve + ``extra_tokens`` fit ``budget``
    tokens (LongBench's rule: the beginning and the end of a long document carry the most). A few
    tokens of slack absorb re-tokenisation at the cut."""
    try:  # cut the text at token boundaries (decoding is not always the inverse of encoding)
        encoded = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        ids, offsets = tokenizer(sample.context, add_special_tokens=False)["input_ids"], None
    rest = count_tokens(tokenizer, f"{sample.separator}{sample.question}{sample.answer_prefix}")
    room = budget - rest - sample.max_new_tokens - extra_tokens - 8
    if len(ids) <= room:
        return sample
    if room < 16:
        raise KVTrimError(f"{sample.task}: a length of {budget} tokens leaves no room for the context.")
    head, tail = room // 2, room - room // 2
    if offsets is not None:
        context = sample.context[: offsets[head - 1][1]] + sample.context[offsets[len(ids) - tail][0] :]
    else:
        context = tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
            ids[len(ids) - tail :], skip_special_tokens=True
        )
    return replace(sample, context=context, metadata={**sample.metadata, "truncated_from": len(ids)})


__all__ = [
    "LONGBENCH",
    "count_score",
    "load_longbench",
    "load_ruler",
    "qa_f1",
    "read_rows",
    "retrieval_score",
    "truncate_middle",
]
