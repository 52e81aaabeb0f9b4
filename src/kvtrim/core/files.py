"""Files kvtrim writes for itself: where they live, written atomically, verified when read.

A crash at any moment of a write leaves either the whole old file or the whole new one: data goes
to a temporary file in the same folder, is fsynced, then renamed over the target (and the folder
is fsynced so the rename survives too). What is read back is checked against a SHA-256 written
with it, so a truncated or damaged file is detected instead of being used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvtrim.core.errors import KVTrimError

TEMP_PREFIX = ".kvtrim-tmp-"


def cache_dir() -> Path:
    """Where kvtrim keeps converted models and calibration data (``KVTRIM_CACHE_DIR`` overrides)."""
    env = os.environ.get("KVTRIM_CACHE_DIR")
    return Path(env) if env else _user_cache() / "kvtrim"


def kernel_dir() -> Path:
    """Where compiled kernels live (``KVTRIM_KERNEL_DIR`` overrides). Not under ``cache_dir()``: a
    fresh cache of models and calibrations (each test module has one) need not rebuild them."""
    env = os.environ.get("KVTRIM_KERNEL_DIR")
    return Path(env) if env else _user_cache() / "kvtrim" / "kernels"


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary folder next to ``target`` that becomes ``target`` (whole) when the block ends.

    Every file in it is fsynced before the rename; on an exception the folder is removed. An
    existing ``target`` is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=TEMP_PREFIX))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files and folders a crashed write left in ``folder``."""
    if not folder.is_dir():
        return
    for entry in folder.glob(TEMP_PREFIX + "*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def read_text(path: str | os.PathLike, what: str = "File") -> str:
    """A UTF-8 text file's content; a missing, unreadable or non-text file is one clear error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise KVTrimError(f"{what} not found: {path}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KVTrimError(
            f"{what} {path} is not UTF-8 text (byte {err.start} cannot be decoded); convert it to UTF-8 "
            "(e.g. iconv -t UTF-8) or extract its text first."
        ) from err
    except OSError as err:
        raise KVTrimError(f"Cannot read {what.lower()} {path}: {err.strerror or err}.") from err
