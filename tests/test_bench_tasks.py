"""Offline task generators (RULER, passkey, needle grid) and RULER's metrics.

Generation is checked where it can silently go wrong: determinism, the token budget in the given
tokenizer, and whether the answers really sit in the context in the expected number.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache

import pytest
from conftest import make_tokenizer

from kvtrim.bench.tasks import haystacks
from kvtrim.bench.tasks.metrics import postprocess_prediction, string_match_all, string_match_part
from kvtrim.bench.tasks.niah import NIAH_CONFIGS
from kvtrim.bench.tasks.qa import load_hotpotqa, load_squad
from kvtrim.bench.tasks.registry import RULER_TASKS, TASKS, expand_task_list, generate, needle_grid
from kvtrim.bench.tasks.ruler import CWE_INTRO, FWE_INTRO
from kvtrim.bench.tasks.sample import Sample, count_tokens, fit_size
from kvtrim.core.errors import KVTrimError

TOK = make_tokenizer(chat_template=False)
LENGTH = 6000  # characters = tokens with the char tokenizer
CWE_LENGTH = 8192  # >= 4096: RULER's 30x / 3x cwe layout, which needs room in characters
SYNTHETIC = [t for t in TASKS if not t.startswith("qa_")]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class WordTokenizer:
    """Word-ish tokens (words and single punctuation marks): a token is far from a character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[str]]:
        return {"input_ids": re.findall(r"\w+|[^\w\s]", text)}


def length_for(task: str) -> int:
    return CWE_LENGTH if task == "cwe" else LENGTH


@cache
def samples(task: str, seed: int = 7) -> tuple[Sample, ...]:
    return tuple(generate(task, TOK, length_for(task), 2, seed=seed))


def assert_fits(sample: Sample, tokenizer, length: int, slack: float = 0.03) -> None:
    total = count_tokens(tokenizer, sample.prompt()) + sample.max_new_tokens
    assert total == sample.metadata["prompt_tokens"] + sample.max_new_tokens
    assert length * (1 - slack) <= total <= length, (sample.task, total, length)


# --- generic properties -------------------------------------------------------------------------


@pytest.mark.parametrize("task", SYNTHETIC)
def test_deterministic_per_seed(task):
    again = tuple(generate(task, TOK, length_for(task), 2, seed=7))
    assert again == samples(task)
    other = generate(task, TOK, length_for(task), 2, seed=8)
    assert [s.prompt() for s in other] != [s.prompt() for s in samples(task)]
    assert samples(task)[0].prompt() != samples(task)[1].prompt()  # samples differ within a seed


@pytest.mark.parametrize("task", SYNTHETIC)
def test_length_within_tolerance(task):
    for sample in samples(task):
        assert sample.task == task
        assert sample.context and sample.question and sample.references
        assert sample.prompt().startswith(sample.context)
        assert_fits(sample, TOK, length_for(task))


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_length_in_a_word_tokenizer(task):
    tok = WordTokenizer()
    for sample in generate(task, tok, 4096, 1, seed=3):
        assert_fits(sample, tok, 4096)
        assert len(sample.prompt()) > 2 * 4096  # sized in tokens, not characters


def test_extra_tokens_are_reserved():
    (sample,) = generate("niah_single_2", TOK, LENGTH, 1, seed=1, extra_tokens=500)
    assert count_tokens(TOK, sample.prompt()) + sample.max_new_tokens + 500 <= LENGTH


def test_reserved_answer_tokens_and_metrics():
    expected = {"niah_single_1": 128, "niah_multiquery": 128, "vt": 30, "cwe": 120, "fwe": 50}
    for task, reserve in expected.items():
        assert samples(task)[0].max_new_tokens == reserve
        assert samples(task)[0].metric == "string_match_all"


def test_too_short_length_is_a_clear_error():
    with pytest.raises(KVTrimError, match="too short"):
        generate("niah_single_1", TOK, 200, 1)


def test_fit_size_finds_the_largest_fitting_size():
    for hint in (None, 3, 40, 400):
        assert fit_size(lambda n: 10 * n + 5, budget=335, lo=0, hint=hint) == 33
    assert fit_size(lambda n: n, budget=10**6, lo=1, hi=50) == 50


# --- needle in a haystack ---------------------------------------------------------------------


def needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


@pytest.mark.parametrize("task", list(NIAH_CONFIGS))
def test_niah_answers_are_in_the_context(task):
    cfg = NIAH_CONFIGS[task]
    for sample in samples(task):
        keys, queries = sample.metadata["keys"], sample.metadata["query"]
        assert len(keys) == max(cfg.n_keys, cfg.n_queries) and len(queries) == cfg.n_queries
        assert len(sample.references) == cfg.n_queries * cfg.n_values
        for ref in sample.references:
            assert sample.context.count(ref) == 1
        # Each key occurs exactly in its own needles: once per value, never in a distractor.
        for key in keys:
            assert sample.context.count(f" for {key} is: ") == cfg.n_values
        for key in queries:
            assert key in sample.question and key in sample.answer_prefix
        asked_needles = [
            v
            for v in sample.references
            if any(needle(cfg.value_kind, k, v) in sample.context for k in queries)
        ]
        assert asked_needles == sample.references
        n_needles = sample.context.count("One of the special magic")
        extra = sample.metadata["size"] if cfg.haystack == "needle" else 0
        assert n_needles == len(keys) * cfg.n_values + extra  # needle haystack: distractor lines
        if cfg.value_kind == "uuids":
            assert all(UUID.match(v) for v in sample.references)
        if cfg.key_kind == "uuids":
            assert all(UUID.match(k) for k in keys)
        else:
            adjectives, nouns = set(haystacks.adjectives()), set(haystacks.nouns())
            for key in keys:
                assert any(
                    key[:i] in adjectives and key[i + 1 :] in nouns for i in range(len(key)) if key[i] == "-"
                )
        singular = cfg.n_queries * cfg.n_values == 1
        assert sample.question.startswith("What is the" if singular else "What are all the")
        assert sample.answer_prefix.endswith(" is" if singular else " are")


def test_niah_single_1_template_is_rulers():
    sample = samples("niah_single_1")[0]
    (key,), (value,) = sample.metadata["query"], sample.references
    assert sample.context.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\nThe grass is green."
    )
    assert needle("numbers", key, value) in sample.context
    assert sample.question == f"What is the special magic number for {key} mentioned in the provided text?"
    assert sample.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert sample.prompt() == f"{sample.context}\n{sample.question}{sample.answer_prefix}"


def test_multiquery_wording_lists_all_keys():
    sample = samples("niah_multiquery")[0]
    a, b, c, d = sample.metadata["query"]
    assert f"for {a}, {b}, {c}, and {d} mentioned" in sample.question
    assert sample.context.startswith("Some special magic numbers are hidden")


def test_essay_haystack_from_a_user_file(tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("Zebras quietly graze near the riverbank. " * 50 + "Owls hoot at dusk. " * 50)
    (sample,) = generate("niah_single_2", TOK, 3000, 1, seed=0, haystack_file=path)
    assert "Zebras quietly graze" in sample.context and "patience" not in sample.context
    assert_fits(sample, TOK, 3000)


def test_needle_grid_covers_lengths_and_depths():
    grid = needle_grid(TOK, [1500, 3000], [0.0, 0.5, 1.0], seed=1)
    assert len(grid) == 6
    assert [s.metadata["target_depth"] for s in grid] == [0.0, 0.5, 1.0] * 2
    assert [(s.metadata["length"], s.metadata["depth"]) for s in grid][::3] == [(1500, 0.0), (3000, 0.0)]
    for sample in grid:
        assert_fits(sample, TOK, sample.metadata["length"], slack=0.07)
        (value,) = sample.references
        haystack = sample.context.split("\n", 1)[1]
        position = haystack.index(value) / len(haystack)
        target = {0: 0.0, 1: 0.5, 2: 1.0}[grid.index(sample) % 3]
        assert abs(position - target) < 0.1
    assert len({s.references[0] for s in grid}) == 1  # same needle everywhere: only depth/length vary
    with pytest.raises(KVTrimError):
        needle_grid(TOK, [1500], [1.5])


# --- vt / cwe / fwe / passkey --------------------------------------------------------------------


def test_vt_chain_is_complete_and_ordered():
    for sample in samples("vt"):
        names, value = sample.references, sample.metadata["value"]
        assert len(names) == 5 and all(len(n) == 5 and n.isupper() for n in names)
        task_text = sample.context.split("\n\nMemorize and track")[-1]
        statements = [f"VAR {names[0]} = {value}"] + [
            f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(4)
        ]
        where = [task_text.index(s) for s in statements]
        assert where == sorted(where)
        assert sample.context.count(f"= {value}") == 1
        assert sample.context.startswith("Memorize and track")  # the worked example comes first
        assert sample.context.count("Question: Find all variables") == 1  # ...with its answer
        assert f"value {value} in the text above" in sample.question
        assert "5 variables are assgined the value" in sample.answer_prefix


def test_cwe_common_words_appear_30_times():
    for sample in samples("cwe"):
        task_list = sample.context.rsplit(CWE_INTRO + "\n", 1)[1]
        entries = re.split(r"(?:^| )\d+\. ", task_list)[1:]
        numbers = [int(n) for n in re.findall(r"(?:^| )(\d+)\. ", task_list)]
        assert numbers == list(range(1, len(entries) + 1))
        counts = Counter(entries)
        assert len(sample.references) == 10
        assert all(counts[w] == 30 for w in sample.references)
        assert all(c == 3 for w, c in counts.items() if w not in sample.references)
        assert len(counts) == sample.metadata["n_words"] > 10


def test_cwe_rare_words_grow_with_length():
    short, long = (generate("cwe", TOK, n, 1, seed=2)[0] for n in (8192, 12000))
    assert long.metadata["n_words"] > short.metadata["n_words"]


def test_fwe_answers_are_the_three_most_frequent():
    for sample in samples("fwe"):
        counts = Counter(sample.context[len(FWE_INTRO) :].split())
        counts.pop("...")
        top = [w for w, _ in counts.most_common(3)]
        assert sorted(top) == sorted(sample.references)
        rest = max(c for w, c in counts.items() if w not in sample.references)
        assert min(counts[w] for w in sample.references) > rest
        assert all(len(w) == 6 and w.isalpha() for w in counts)


def test_passkey_is_stated_twice():
    for sample in samples("passkey"):
        (key,) = sample.references
        assert sample.context.count(key) == 2 and f"The pass key is {key}. Remember it." in sample.context
        assert sample.question == "What is the pass key?"


# --- metrics ----------------------------------------------------------------------------------


def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert string_match_all("only 123 here", ["123", "456", "789", "000"]) == 25.0
    assert string_match_all("FOO-Bar", ["foo-bar"]) == 100.0  # case-insensitive
    assert string_match_all("nothing", ["123"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_string_match_part():
    assert string_match_part("It was Denver Broncos.", ["Denver Broncos", "Broncos"]) == 100.0
    assert string_match_part("It was the broncos", ["Denver Broncos", "Broncos"]) == 100.0
    assert string_match_part("Carolina", ["Denver Broncos", "Broncos"]) == 0.0


def test_sample_score_cleans_the_prediction():
    sample = samples("niah_multivalue")[0]
    assert sample.score("  " + ", ".join(sample.references) + "\x00") == 100.0
    assert sample.score(sample.references[0]) == 25.0
    assert postprocess_prediction(" a\tb\x01 ") == "a\nb"


# --- qa ---------------------------------------------------------------------------------------

SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "Broncos",
            "paragraphs": [
                {
                    "context": "The Denver Broncos won Super Bowl 50 in Santa Clara, California.",
                    "qas": [
                        {
                            "question": "Who won Super Bowl 50?",
                            "id": "a",
                            "is_impossible": False,
                            "answers": [
                                {"text": "Denver Broncos", "answer_start": 4},
                                {"text": "Broncos", "answer_start": 11},
                            ],
                        },
                        {
                            "question": "Who lost Super Bowl 51?",
                            "id": "b",
                            "is_impossible": True,
                            "answers": [],
                        },
                    ],
                },
                {
                    "context": "The game was played at Levi's Stadium.",
                    "qas": [
                        {
                            "question": "Where was the game played?",
                            "id": "c",
                            "is_impossible": False,
                            "answers": [{"text": "Levi's Stadium", "answer_start": 23}],
                        }
                    ],
                },
            ],
        },
        {
            "title": "Rivers",
            "paragraphs": [
                {"context": f"River number {i} flows into the sea near town {i}.", "qas": []}
                for i in range(30)
            ],
        },
    ],
}
HOTPOT = [
    {
        "_id": f"q{q}",
        "question": f"Which town is on river {q}?",
        "answer": f"Town{q}",
        "type": "bridge",
        "level": "easy",
        "supporting_facts": [[f"River {q}", 0]],
        "context": [[f"River {q}", [f"River {q} passes through Town{q}.", " It is long."]]]
        + [[f"Hill {q}-{j}", [f"Hill {q}-{j} is a hill.", " It is green."]] for j in range(3)],
    }
    for q in range(12)
]


@pytest.fixture
def qa_files(tmp_path):
    squad, hotpot = tmp_path / "squad.json", tmp_path / "hotpot.json"
    squad.write_text(json.dumps(SQUAD))
    hotpot.write_text(json.dumps(HOTPOT))
    return {"qa_1": squad, "qa_2": hotpot}


def test_qa_loaders(qa_files):
    squad = load_squad(qa_files["qa_1"])
    assert len(squad.items) == 2 and len(squad.docs) == 32  # the impossible question is dropped
    first = next(i for i in squad.items if i.question == "Who won Super Bowl 50?")
    assert first.answers == ("Denver Broncos", "Broncos") and len(first.related) == 1
    assert "Denver Broncos" in squad.docs[first.gold[0]]
    hotpot = load_hotpotqa(qa_files["qa_2"])
    assert len(hotpot.items) == 12 and len(hotpot.docs) == 48
    item = hotpot.items[3]
    assert item.answers == ("Town3",) and len(item.gold) == 4
    assert "River 3\nRiver 3 passes through Town3. It is long." in [hotpot.docs[g] for g in item.gold]


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_samples(task, qa_files):
    made = generate(task, TOK, 1200, 2, seed=5, data_file=qa_files[task])
    assert made == generate(task, TOK, 1200, 2, seed=5, data_file=qa_files[task])
    assert made != generate(task, TOK, 1200, 2, seed=6, data_file=qa_files[task])
    assert made[0].question != made[1].question  # distinct questions
    for sample in made:
        assert sample.metric == "string_match_part" and sample.max_new_tokens == 32
        assert any(ref in sample.context for ref in sample.references)
        assert sample.question.endswith(sample.question.split("Question: ")[-1])
        assert (
            sample.context.count("Document ") == sample.metadata["n_docs"] > len(sample.metadata["gold_docs"])
        )
        assert sample.answer_prefix == " Answer:" and sample.separator == "\n\n"
        assert sample.score(f"{sample.references[0]}.") == 100.0
        assert_fits(sample, TOK, 1200, slack=0.1)


def test_qa_needs_its_file(tmp_path):
    with pytest.raises(KVTrimError, match="SQuAD"):
        generate("qa_1", TOK, 2000, 1)
    with pytest.raises(KVTrimError, match="does not exist"):
        generate("qa_2", TOK, 2000, 1, data_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(KVTrimError, match="SQuAD layout"):
        load_squad(bad)


# --- task lists -------------------------------------------------------------------------------


def test_expand_task_list(qa_files):
    assert len(RULER_TASKS) == 13
    with pytest.warns(UserWarning) as caught:
        ruler = expand_task_list("ruler")
    assert [str(w.message).split(":")[0] for w in caught] == ["skipping qa_1", "skipping qa_2"]
    assert ruler == [t for t in RULER_TASKS if not t.startswith("qa_")]
    assert expand_task_list("ruler", data_files=qa_files) == list(RULER_TASKS)
    assert expand_task_list("niah_single_1, vt,niah_single_1") == ["niah_single_1", "vt"]
    assert expand_task_list(["passkey", "niah"])[:2] == ["passkey", "niah_single_1"]
    for bad in ("nope", "vt,nope", "", "qa_1"):
        with pytest.raises(KVTrimError):
            expand_task_list(bad)
    with pytest.raises(KVTrimError, match="unknown task"):
        generate("nope", TOK, 1000, 1)
