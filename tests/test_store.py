"""The context store: content-addressed, atomic, verified on load, LRU-bounded, shared by processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim.core.errors import KVTrimError
from kvtrim.models.fingerprint import model_fingerprint
from kvtrim.store import ContextStore, context_key

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return make_model("llama"), make_tokenizer()


def _put(store, model, tok, seed=0, spec="knorm@0.5"):
    session = kvtrim.compress(model, tok, sample_text(300, seed=seed), spec=spec)
    ids = session.layout.context_text
    key = context_key(model_fingerprint(model), spec, [ord(c) for c in ids])
    return key, session, store.put(key, session, model_fingerprint(model), spec)


def test_round_trip_answers_identically(tmp_path, llama):
    model, tok = llama
    store = ContextStore(tmp_path)
    key, session, entry = _put(store, model, tok)
    assert entry.n_tokens == session.context_length and entry.kv_bytes == session.stats.kv_bytes_after
    loaded = store.load(key, model, tok)
    assert loaded is not None
    assert (
        loaded.answer("What?", max_new_tokens=12).token_ids
        == session.answer("What?", max_new_tokens=12).token_ids
    )
    assert [e.id for e in store.entries()] == [key]
    reopened = ContextStore(tmp_path)  # another process's view: the index is on disk
    assert reopened.get(key) is not None


def test_a_flipped_bit_is_quarantined_and_never_served(tmp_path, llama):
    model, tok = llama
    store = ContextStore(tmp_path)
    key, _, _ = _put(store, model, tok)
    blob = tmp_path / "blobs" / key / "cache.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    assert store.load(key, model, tok) is None
    assert store.get(key) is None and store.quarantined_total() == 1
    assert [p.name.split("-")[0] for p in (tmp_path / "quarantine").iterdir()] == [key]


def test_a_crash_between_blob_and_index_leaves_no_entry(tmp_path, llama, monkeypatch):
    model, tok = llama
    store = ContextStore(tmp_path)

    def crash(entry):
        raise OSError("power cut")

    monkeypatch.setattr(store.index, "add", crash)
    with pytest.raises(OSError):
        _put(store, model, tok)
    assert store.entries() == []
    assert len(list((tmp_path / "blobs").iterdir())) == 1  # the folder was written, not indexed
    (tmp_path / "tmp" / "half-written").mkdir()
    ContextStore(tmp_path, stale_after_s=0)  # the next start removes both leftovers
    assert list((tmp_path / "blobs").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_size_limit_evicts_least_recently_used(tmp_path, llama):
    model, tok = llama
    store = ContextStore(tmp_path)
    first, _, entry = _put(store, model, tok, seed=1)
    limited = ContextStore(tmp_path, max_bytes=int(entry.disk_bytes * 2.5))
    second, _, _ = _put(limited, model, tok, seed=2)
    time.sleep(0.01)
    assert limited.load(first, model, tok) is not None  # first is now the most recently used
    third, _, _ = _put(limited, model, tok, seed=3)
    assert {e.id for e in limited.entries()} == {first, third}
    assert not (tmp_path / "blobs" / second).exists()


def test_ids_are_hex_only(tmp_path):
    store = ContextStore(tmp_path)
    for bad in ("../../etc/passwd", "A" * 32, "0" * 31, "0" * 31 + "/", ""):
        with pytest.raises(KVTrimError, match="32 lowercase hex"):
            store.get(bad)


_WRITER = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import kvtrim
from conftest import make_model, make_tokenizer, sample_text
from kvtrim.models.fingerprint import model_fingerprint
from kvtrim.store import ContextStore, context_key
model, tok = make_model("llama"), make_tokenizer()
store = ContextStore({root!r})
for seed in range({start}, {start} + 3):
    session = kvtrim.compress(model, tok, sample_text(200, seed=seed), spec="knorm@0.5")
    key = context_key(model_fingerprint(model), "knorm@0.5", [seed])
    store.put(key, session, model_fingerprint(model), "knorm@0.5")
    assert store.load(key, model, tok) is not None
print("ok")
"""


def test_two_processes_share_one_store(tmp_path):
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER.format(tests=tests, root=str(tmp_path), start=start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for start in (0, 1)  # seeds 1 and 2 are written by both: the same ids at the same time
    ]
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0 and out.strip() == "ok", err[-2000:]
    store = ContextStore(tmp_path)
    assert len(store.entries()) == 4 and store.quarantined_total() == 0
