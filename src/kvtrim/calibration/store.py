"""Calibration artefacts on disk: safetensors with a version and a SHA-256 per tensor.

An artefact is computed once per model (keyed by its fingerprint) and loaded from then on. It is
written atomically (:func:`kvtrim.core.files.write_atomic`) and every tensor is checked against
its checksum when read, so what a crash mid-write or a damaged disk leaves is never used: it is
computed again, with a one-line warning. A file written by another version of the computation is
recomputed silently.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import cache_dir, remove_leftovers, sha256_bytes, write_atomic
from kvtrim.models.fingerprint import model_fingerprint


class DamagedArtefact(Exception):
    """A stored artefact that cannot be trusted (truncated, unreadable, checksum mismatch)."""


def artefact_path(model: torch.nn.Module, file_name: str) -> Path:
    return cache_dir() / "calibration" / model_fingerprint(model) / file_name


def _checksum(tensor: torch.Tensor) -> str:
    return sha256_bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def save_artefact(path: Path, tensors: dict[str, torch.Tensor], version: int) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    checksums = json.dumps({k: _checksum(v) for k, v in tensors.items()}, sort_keys=True)
    write_atomic(path, save(tensors, metadata={"version": str(version), "sha256": checksums}))


def read_artefact(path: Path, version: int) -> dict[str, torch.Tensor] | None:
    """The tensors at ``path`` if it holds this ``version``; None if absent or of another version.
    Raises :class:`DamagedArtefact` when the file cannot be trusted."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the file is unusable
        raise DamagedArtefact(f"unreadable: {type(err).__name__}") from err
    if metadata.get("version") != str(version) or "sha256" not in metadata:
        return None
    expected = json.loads(metadata["sha256"])
    if set(expected) != set(tensors) or any(_checksum(t) != expected[k] for k, t in tensors.items()):
        raise DamagedArtefact("checksum mismatch")
    return tensors


def load_or_compute(
    path: Path,
    version: int,
    what: str,
    command: str,
    compute: Callable[[], dict[str, torch.Tensor]],
    tokenizer: Any,
    cached: bool,
) -> dict[str, torch.Tensor]:
    """The tensors saved at ``path`` by this ``version`` of a calibration, else ``compute()``d and
    saved. ``cached=False`` (given texts, or a refresh) always computes."""
    remove_leftovers(path.parent)
    if cached:
        try:
            stored = read_artefact(path, version)
        except DamagedArtefact as err:
            print(f"kvtrim: warning: {path} is damaged ({err}); computing {what} again", file=sys.stderr)
            stored = None
        if stored is not None:
            return stored
    if tokenizer is None:
        raise KVTrimError(f"{what} need calibration for this model: pass the tokenizer (or run `{command}`).")
    print(f"kvtrim: calibrating {what} for this model (once; cached in {path.parent})", file=sys.stderr)
    tensors = compute()
    save_artefact(path, tensors, version)
    return tensors
