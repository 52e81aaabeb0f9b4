"""``kvtrim serve``, started as users start it (a uvicorn process on 127.0.0.1), through the real
``openai`` client: answers equal ``Session.ask``, stored contexts are reused across requests and
restarts, damaged entries are never served, and bad requests get OpenAI-style errors."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim.serve.process import Server

SPEC = "knorm@0.5"
KEY = "test-key"
QUESTIONS = [f"Which word comes {n}?" for n in ("first", "second", "third", "fourth", "fifth", "sixth")]
DOCUMENT = sample_text(600, seed=3)
EXTRA = (
    "--spec",
    SPEC,
    "--min-context-tokens",
    "64",
    "--api-key",
    KEY,
    "--max-request-bytes",
    "100000",
    "--queue-size",
    "8",
    "--max-tokens",
    "24",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("serve-model")
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "store"


@pytest.fixture(scope="module")
def server(model_dir, store):
    running = Server(model_dir, store, *EXTRA).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(model_dir) -> dict[str, str]:
    """Each question's answer from a Session in this process (same weights, same spec)."""
    model, tokenizer = kvtrim.load_model(model_dir)
    session = kvtrim.compress(model, tokenizer, DOCUMENT, spec=SPEC)
    return {q: session.ask(q, max_new_tokens=24) for q in QUESTIONS}


def _chat(client, model_dir, question, **kwargs):
    content = f"{DOCUMENT}\n\n{question}"
    return client.chat.completions.create(
        model=model_dir,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=24,
        **kwargs,
    )


def _metric(server, name: str) -> float:
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _post(server, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method="POST")
    return _send(request)


def _send(request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_answers_equal_the_library_and_the_document_is_reused(server, client, model_dir, expected):
    first = _chat(client, model_dir, QUESTIONS[0])
    assert first.choices[0].message.content.strip() == expected[QUESTIONS[0]]
    usage = first.usage.model_dump()
    assert usage["kvtrim"]["source"] == "computed" and usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["kvtrim"]["kv_bytes_after"] < usage["kvtrim"]["kv_bytes_before"]
    prefilled = _metric(server, "kvtrim_prefill_tokens_total")
    second = _chat(client, model_dir, QUESTIONS[1])
    assert second.choices[0].message.content.strip() == expected[QUESTIONS[1]]
    reused = second.usage.model_dump()
    assert reused["kvtrim"]["context_id"] == usage["kvtrim"]["context_id"]
    assert reused["prompt_tokens_details"]["cached_tokens"] == usage["kvtrim"]["context_tokens"] > 64
    question_tokens = reused["prompt_tokens"] - reused["kvtrim"]["context_tokens"]
    assert (
        _metric(server, "kvtrim_prefill_tokens_total") == prefilled + question_tokens
    )  # no document prefill


def test_streaming_gives_the_same_answer_and_usage(client, model_dir, expected):
    stream = _chat(client, model_dir, QUESTIONS[2], stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(pieces).strip() == expected[QUESTIONS[2]]
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def test_text_completions_and_stop_strings(client, model_dir):
    done = client.completions.create(
        model=model_dir, prompt=f"{DOCUMENT}\n\nContinue:", max_tokens=16, temperature=0
    )
    text = done.choices[0].text
    assert done.usage.completion_tokens == 16 and text
    stop = text.strip()[:2]
    stopped = client.completions.create(
        model=model_dir, prompt=f"{DOCUMENT}\n\nContinue:", max_tokens=16, temperature=0, stop=[stop]
    )
    assert stop not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    assert text.startswith(stopped.choices[0].text)


def test_sampling_is_reproducible_with_a_seed(client, model_dir):
    answers = [_chat(client, model_dir, QUESTIONS[3], seed=7).choices[0].message.content for _ in range(2)]
    hot = client.chat.completions.create(
        model=model_dir,
        messages=[{"role": "user", "content": f"{DOCUMENT}\n\n{QUESTIONS[3]}"}],
        temperature=1.5,
        seed=11,
        max_tokens=24,
    )
    again = client.chat.completions.create(
        model=model_dir,
        messages=[{"role": "user", "content": f"{DOCUMENT}\n\n{QUESTIONS[3]}"}],
        temperature=1.5,
        seed=11,
        max_tokens=24,
    )
    assert answers[0] == answers[1] and hot.choices[0].message.content == again.choices[0].message.content


def test_explicit_contexts(server, client, model_dir, expected):
    status, card = _post(server, "/v1/contexts", {"text": DOCUMENT, "spec": SPEC})
    assert (
        status == 200
        and re.fullmatch(r"[0-9a-f]{32}", card["id"])
        and card["kv_bytes"] < card["kv_bytes_full"]
    )
    answer = client.chat.completions.create(
        model=model_dir,
        messages=[{"role": "user", "content": QUESTIONS[4]}],
        temperature=0,
        max_tokens=24,
        extra_body={"kvtrim": {"context_id": card["id"]}},
    )
    assert answer.choices[0].message.content.strip() == expected[QUESTIONS[4]]
    assert answer.usage.model_dump()["prompt_tokens_details"]["cached_tokens"] == card["tokens"]
    listing = client.get("/contexts", cast_to=object)
    assert card["id"] in [c["id"] for c in listing["data"]]
    fetched = client.get(f"/contexts/{card['id']}", cast_to=object)
    assert fetched["tokens"] == card["tokens"]


def test_eight_concurrent_clients_get_their_own_answers(server, client, model_dir, expected):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        question = QUESTIONS[i % len(QUESTIONS)]
        results[i] = _chat(client, model_dir, question).choices[0].message.content.strip()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {i: results.get(i) for i in range(8)} == {
        i: expected[QUESTIONS[i % len(QUESTIONS)]] for i in range(8)
    }
    assert _metric(server, "kvtrim_batched_requests_total") > 0  # those waiting together ran as a batch


def test_a_full_queue_answers_429(server, model_dir):
    statuses: list[int] = []
    body = {
        "model": model_dir,
        "messages": [{"role": "user", "content": f"{DOCUMENT}\n\nGo on."}],
        "max_tokens": 300,
        "temperature": 0,
    }

    def call() -> None:
        statuses.append(_post(server, "/v1/chat/completions", body)[0])

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}


def test_request_errors(server, model_dir):
    good = {"model": model_dir, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    status, body = _post(server, "/v1/chat/completions", good, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _post(server, "/v1/chat/completions", good, key="wrong")[0] == 401
    status, body = _post(
        server, "/v1/chat/completions", {**good, "messages": [{"role": "user", "content": "x" * 200_000}]}
    )
    assert status == 413 and "error" in body
    status, body = _post(server, "/v1/chat/completions", {**good, "kvtrim": {"spec": "nosuch@0.5"}})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(server, "/v1/chat/completions", {**good, "max_tokens": 10**6})
    assert status == 400 and "window" in body["error"]["message"]
    status, body = _post(server, "/v1/chat/completions", {**good, "max_tokens": "many"})
    assert status == 422 and body["error"]["param"] == "max_tokens"
    assert _post(server, "/v1/chat/completions", b"{not json")[0] == 422
    assert _post(server, "/v1/chat/completions", {**good, "model": "other"})[0] == 404
    status, body = _post(
        server, "/v1/chat/completions", {**good, "kvtrim": {"context_id": "../../etc/passwd"}}
    )
    assert status == 400 and "hex" in body["error"]["message"]
    for bad in ("..%2F..%2Fetc%2Fpasswd", "ZZZZ", "0" * 31):
        request = urllib.request.Request(
            f"{server.url}/v1/contexts/{bad}", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert _send(request)[0] in (400, 404)
    missing = urllib.request.Request(
        f"{server.url}/v1/contexts/{'0' * 32}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert _send(missing)[0] == 404


def test_restart_reuses_the_store_and_a_damaged_entry_is_recomputed(
    server, client, model_dir, store, expected
):
    context_id = _chat(client, model_dir, QUESTIONS[0]).usage.model_dump()["kvtrim"]["context_id"]
    server.kill()  # as a crash would
    server.start()
    again = _chat(client, model_dir, QUESTIONS[0])
    usage = again.usage.model_dump()
    assert again.choices[0].message.content.strip() == expected[QUESTIONS[0]]
    assert usage["kvtrim"]["source"] == "store" and usage["kvtrim"]["context_id"] == context_id
    assert _metric(server, 'kvtrim_context_lookups_total{source="computed"}') == 0
    server.stop()
    blob = store / "blobs" / context_id / "cache.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10
    blob.write_bytes(bytes(data))
    server.start()
    recomputed = _chat(client, model_dir, QUESTIONS[0])
    assert recomputed.choices[0].message.content.strip() == expected[QUESTIONS[0]]
    assert recomputed.usage.model_dump()["kvtrim"]["source"] == "computed"
    assert _metric(server, "kvtrim_store_quarantined") == 1
    assert any(p.name.startswith(context_id) for p in (store / "quarantine").iterdir())
    status, _ = _send(
        urllib.request.Request(
            f"{server.url}/v1/contexts/{context_id}",
            method="DELETE",
            headers={"Authorization": f"Bearer {KEY}"},
        )
    )
    assert status == 200 and not (store / "blobs" / context_id).exists()


def test_a_client_that_disconnects_stops_its_generation(server, model_dir):
    name = 'kvtrim_cancelled_requests_total{reason="disconnected"}'
    before = _metric(server, name)
    body = {
        "model": model_dir,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline().startswith(b"data: ")  # the stream began; now hang up
    for _ in range(100):
        if _metric(server, name) > before:
            break
        time.sleep(0.1)
    assert _metric(server, name) == before + 1
    tokens = _metric(server, "kvtrim_completion_tokens_total")
    assert _metric(server, "kvtrim_completion_tokens_total") == tokens  # nothing is still generating


def test_a_request_past_its_timeout_gets_504(model_dir, tmp_path):
    slow = Server(model_dir, tmp_path / "store", "--timeout", "0.001").start()  # over before it starts
    try:
        body = {"model": model_dir, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 900}
        status, answer = _post(slow, "/v1/chat/completions", body, key=None)
        assert status == 504 and answer["error"]["code"] == "timeout"
        assert _metric_open(slow, 'kvtrim_cancelled_requests_total{reason="timeout"}') == 1
    finally:
        slow.stop()


def _metric_open(server, name: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
