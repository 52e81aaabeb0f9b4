"""Files kvtrim writes for itself: atomic, verified on load, recomputed (with one warning) when
damaged; and the command line's user errors, each one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cli_runner import run_here, run_process
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
import kvtrim.calibration.artefacts as artefacts
from kvtrim.calibration.store import DamagedArtefact, read_artefact, save_artefact
from kvtrim.core.files import TEMP_PREFIX, atomic_dir, remove_leftovers, write_atomic
from kvtrim.models import loading

pytestmark = pytest.mark.usefixtures("one_thread")


def test_atomic_write_leaves_old_or_new_never_a_part(tmp_path, monkeypatch):
    target = tmp_path / "a" / "file.bin"
    write_atomic(target, b"old")
    real_replace = loading.os.replace

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr("kvtrim.core.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new content")
    monkeypatch.setattr("kvtrim.core.files.os.replace", real_replace)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # the temp file is gone too
    (target.parent / f"{TEMP_PREFIX}left-by-a-crash").write_bytes(b"x")
    remove_leftovers(target.parent)
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_atomic_dir_appears_whole(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"


def test_artefacts_are_verified_on_load(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"filters": torch.randn(3, 2, 16)}
    save_artefact(path, tensors, version=1)
    torch.testing.assert_close(read_artefact(path, 1)["filters"], tensors["filters"])
    assert read_artefact(path, 2) is None  # another version of the computation: stale, not damaged
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedArtefact, match="checksum"):
        read_artefact(path, 1)
    path.write_bytes(bytes(data[: len(data) // 2]))  # what a crash mid-write would leave
    with pytest.raises(DamagedArtefact, match="unreadable"):
        read_artefact(path, 1)


def test_a_damaged_calibration_is_recomputed_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(artefacts, "bundled_texts", lambda: [sample_text(3000, seed=3)])
    model, tok = make_model("llama"), make_tokenizer()
    small = dict(n_sequences=2, seq_len=200)
    filters = artefacts.load_or_compute_qfilters(model, tok, **small)
    path = artefacts.qfilters_path(model)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    capsys.readouterr()
    again = artefacts.load_or_compute_qfilters(model, tok, **small)
    err = capsys.readouterr().err
    assert "warning" in err and "damaged" in err and "Traceback" not in err
    torch.testing.assert_close(again, filters)  # the same computation, done again
    assert read_artefact(path, artefacts.QFILTERS_VERSION) is not None  # and stored whole


def test_a_damaged_converted_model_is_converted_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"stands for a GGUF file")
    conversions = []

    def convert(source, target):  # a real save_pretrained folder, as the conversion writes it
        conversions.append(target)
        with atomic_dir(target) as tmp:
            make_model("llama").save_pretrained(tmp)
            make_tokenizer().save_pretrained(tmp)
            loading.write_manifest(tmp, source=str(source))

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    folder = loading._converted_gguf_dir(gguf)
    assert loading.verify_manifest(folder) is None and len(conversions) == 1
    assert loading._converted_gguf_dir(gguf) == folder and len(conversions) == 1  # verified, reused
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64])
    assert "bytes" in loading.verify_manifest(folder)
    capsys.readouterr()
    loading._converted_gguf_dir(gguf)
    assert len(conversions) == 2 and "damaged" in capsys.readouterr().err
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": 65'))  # same size
    assert "checksum" in loading.verify_manifest(folder)


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    err = result.stderr
    assert result.returncode == 2, err
    assert fragment in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("kvtrim: error")]) == 1


def test_cli_user_errors_are_one_line(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\xe9 cr\xe8me, d\xe9j\xe0 vu.".encode("latin-1"))
    assert_user_error(run_here("ask", str(latin), "-q", "q?"), "is not UTF-8 text")
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    assert_user_error(
        run_here("ask", str(doc), "-q", "q?", "--method", "expected-attention:epsilon=abc"),
        "epsilon must be a number, got 'abc'",
    )
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert_user_error(run_here("ask", str(doc), "-q", "q?", "--model", str(empty)), "no config.json")
    assert_user_error(
        run_here("ask", str(doc), "-q", "q?", "--spec", "knorm@0.5", "--ratio", "0.2"), "--spec"
    )
    assert_user_error(
        run_here("ask", str(doc), "-q", "q?", "--spec", "knorm@0.5/chunk=8+adaptive"), "must be a number"
    )
    assert_user_error(run_here("ask", str(doc), "-q", "q?", "--method", "snapkv", "--chunk", "16"), "chunked")


def test_help_does_not_load_the_library():
    code = "import sys; from kvtrim.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    result = run_process("--help")
    assert result.returncode == 0 and "ask" in result.stdout


def test_ask_takes_a_spec(tmp_path):
    folder = tmp_path / "tiny"
    make_model("llama", max_positions=256).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(150))
    common = ["ask", str(doc), "-q", "q?", "--model", str(folder), "--json", "--max-new-tokens", "3"]
    by_spec = json.loads(run_here(*common, "--spec", "knorm@0.25+tokens:tokens=40/chunk=32").stdout)
    by_flags = json.loads(
        run_here(
            *common, "--method", "knorm", "--ratio", "0.25", "--budget-tokens", "40", "--chunk", "32"
        ).stdout
    )
    assert by_spec["spec"] == by_flags["spec"] == "knorm@0.25+tokens:tokens=40/chunk=32"
    assert by_spec["answers"] == by_flags["answers"]
    assert by_spec["kv_tokens_after"] == by_flags["kv_tokens_after"] == 40 * 3 * 2
    assert kvtrim.CompressionSpec.parse(by_spec["spec"]).chunk_size == 32
