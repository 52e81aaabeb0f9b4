"""A compressed session on disk: its cache in safetensors (no pickle) and a JSON manifest.

``save_session`` writes a folder atomically (a temporary folder, every file fsynced, renamed):
``cache.safetensors`` and ``manifest.json`` (kvtrim version, format version, model and tokenizer
fingerprints, the ``CompressionSpec``, the prompt layout and the context's token ids, the position
the next token takes, the figures, each layer's kind, and the SHA-256 of the tensor file and of
every tensor). ``load_session`` checks all of it before building anything: another model or
tokenizer, a newer format, a missing, truncated or altered file each raise one
:class:`~kvtrim.core.errors.KVTrimError`, and nothing is half-loaded. A loaded session answers
exactly as the saved one (greedy tokens equal). ``Session.save`` and ``kvtrim.load_session``
(:mod:`kvtrim.sessions.load`) are the public doors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kvtrim.attention import enable
from kvtrim.cache.serialize import cache_tensors, restore_cache
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import atomic_dir, sha256_file
from kvtrim.core.spec import CompressionSpec
from kvtrim.core.stats import CompressionStats
from kvtrim.core.version import __version__
from kvtrim.models.adapters import model_device
from kvtrim.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import PromptLayout, encode

FORMAT = "kvtrim-session"
FORMAT_VERSION = 1
TENSORS = "cache.safetensors"
MANIFEST = "manifest.json"


def save_session(session: Any, path: str | Path) -> Path:
    """Write ``session`` to the folder ``path`` (replaced if it exists); returns the folder."""
    if session.evicts_while_decoding:
        raise KVTrimError(
            "A session that evicts while decoding cannot be saved (its eviction state is live)."
        )
    tensors, layers = cache_tensors(session.cache)
    layout = session.layout
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kvtrim_version": __version__,
        "model": model_fingerprint(session.model),
        "tokenizer": tokenizer_fingerprint(session.tokenizer),
        "spec": None if session.spec is None else session.spec.to_dict(),
        "method": session.method,
        "ratio": session.ratio,
        "budget": session.budget,
        "question": session.question,
        "layout": dataclasses.asdict(layout),
        "context_token_ids": encode(session.tokenizer, layout.context_text, layout.add_special_tokens),
        "context_length": session.context_length,
        "next_position": session.first_position,
        "prefill_s": session.prefill_s,
        "stats": dataclasses.asdict(session.stats),
        "layers": layers,
        "tensors": {name: _tensor_entry(tensor) for name, tensor in tensors.items()},
    }
    target = Path(path).expanduser()
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        manifest["file_sha256"] = sha256_file(tmp / TENSORS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return target


def read_session(model: nn.Module, tokenizer: Any, path: str | Path) -> dict[str, Any]:
    """The fields of the session saved in ``path`` (all but model and tokenizer), its cache on
    ``model``'s device; refuses anything that does not match (see :func:`kvtrim.load_session`)."""
    folder = Path(path).expanduser()
    manifest = _read_manifest(folder)
    fingerprint = model_fingerprint(model)
    if manifest["model"] != fingerprint:
        raise KVTrimError(
            f"{folder} was saved with another model ({manifest['model']}); this one is {fingerprint}."
        )
    if manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise KVTrimError(
            f"{folder} was saved with another tokenizer; load it with the tokenizer it was made with."
        )
    tensors = _read_tensors(folder, manifest)
    enable(model)  # ragged and pruned layers need kvtrim's attention; on ordinary ones it is sdpa
    cache = restore_cache(new_cache(model), tensors, manifest["layers"], model_device(model))
    stats = CompressionStats(**manifest["stats"])
    spec = None if manifest["spec"] is None else CompressionSpec.from_dict(manifest["spec"])
    next_position = int(manifest["next_position"])
    context_length = int(manifest.get("context_length", next_position))  # written since key re-rotation
    return dict(
        cache=cache,
        layout=PromptLayout(**manifest["layout"]),
        context_length=context_length,
        next_position=None if next_position == context_length else next_position,
        method=manifest["method"],
        ratio=float(manifest["ratio"]),
        stats=stats,
        prefill_s=float(manifest["prefill_s"]),
        budget=manifest["budget"],
        question=manifest["question"],
        spec=spec,
    )


def _tensor_entry(tensor: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "sha256": _tensor_sha256(tensor)}


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any]:
    file = folder / MANIFEST
    if not file.is_file():
        raise KVTrimError(f"{folder} is not a saved kvtrim session (no {MANIFEST}).")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise KVTrimError(f"{file} is damaged: {type(err).__name__}.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KVTrimError(f"{file} is not a kvtrim session manifest.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise KVTrimError(
            f"{folder} was written in session format {version} by kvtrim {manifest.get('kvtrim_version')}; "
            f"this kvtrim ({__version__}) reads format {FORMAT_VERSION} and older. Upgrade kvtrim."
        )
    missing = [
        key
        for key in ("model", "tokenizer", "layers", "tensors", "file_sha256", "stats")
        if key not in manifest
    ]
    if missing:
        raise KVTrimError(f"{file} lacks {', '.join(missing)}.")
    return manifest


def _read_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = folder / TENSORS
    if not file.is_file():
        raise KVTrimError(f"{folder} has no {TENSORS}.")
    if sha256_file(file) != manifest["file_sha256"]:
        raise KVTrimError(
            f"{file} does not match its checksum: it is truncated or altered. Save the session again."
        )
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise KVTrimError(f"{file} cannot be read: {err}") from err
    if set(tensors) != set(manifest["tensors"]):
        raise KVTrimError(f"{file} does not hold the tensors its manifest lists.")
    for name, tensor in tensors.items():
        if _tensor_sha256(tensor) != manifest["tensors"][name]["sha256"]:
            raise KVTrimError(f"Tensor {name} of {file} does not match its checksum.")
    return tensors
