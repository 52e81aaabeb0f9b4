"""``ContextStore``: compressed sessions on local disk, content-addressed, verified on every load.

An entry's id is a hash of the model fingerprint, the canonical spec and the context's token ids,
so the same document compressed the same way on the same model is stored once, whoever asks. A
write goes to a temporary folder (every file fsynced), is renamed into ``blobs/<id>``, and only
then indexed (:mod:`kvtrim.store.index`): a crash at any point leaves the whole entry or none, and
what a crash left behind is removed at the next start. Every load checks the manifest and every
checksum (:func:`kvtrim.sessions.stored.read_session`); an entry that fails is moved to
``quarantine/``, counted, and reported as absent, never served. ``max_bytes`` bounds the folders'
total size by evicting least-recently-used entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import remove_leftovers
from kvtrim.sessions import Session
from kvtrim.sessions.load import load_session
from kvtrim.store.index import Entry, StoreIndex

log = logging.getLogger("kvtrim.store")

#: an entry id: 32 lowercase hex digits; nothing else is ever turned into a path
ID_PATTERN = re.compile(r"[0-9a-f]{32}")


def context_key(model_fingerprint: str, spec: str, token_ids: Sequence[int]) -> str:
    """The id of a context: what it is (token ids), how it is compressed (spec) and on what model."""
    payload = json.dumps([model_fingerprint, spec, list(token_ids)], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def check_id(entry_id: str) -> str:
    """``entry_id`` if it is a well-formed id; a clear error otherwise (no path is built from it)."""
    if not isinstance(entry_id, str) or not ID_PATTERN.fullmatch(entry_id):
        raise KVTrimError(f"Bad context id {entry_id!r}: an id is 32 lowercase hex digits.")
    return entry_id


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class ContextStore:
    """The compressed contexts under ``root``; safe to share between threads and processes."""

    def __init__(self, root: str | Path, max_bytes: int | None = None, stale_after_s: float = 600.0):
        if max_bytes is not None and max_bytes <= 0:
            raise KVTrimError(f"The store's size limit must be positive, got {max_bytes} bytes.")
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.blobs, self.tmp, self.quarantine_dir = (
            self.root / "blobs",
            self.root / "tmp",
            self.root / "quarantine",
        )
        for folder in (self.blobs, self.tmp, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.index = StoreIndex(self.root / "index.sqlite")
        self.quarantined_here = 0
        self._clean(stale_after_s)

    def _clean(self, stale_after_s: float) -> None:
        """Remove what crashed writes left: temporary folders, and complete folders never indexed.

        Only leftovers older than ``stale_after_s`` go: another process may be writing right now."""
        cutoff = time.time() - stale_after_s
        remove_leftovers(self.blobs)
        for entry in self.tmp.iterdir():
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        indexed = self.index.ids()
        for folder in self.blobs.iterdir():
            if folder.name not in indexed and folder.stat().st_mtime < cutoff:
                log.warning(
                    "store: removing %s, written but never indexed (an interrupted write)", folder.name
                )
                shutil.rmtree(folder, ignore_errors=True)

    # --- reading ------------------------------------------------------------------------------

    def get(self, entry_id: str) -> Entry | None:
        return self.index.get(check_id(entry_id))

    def entries(self, model: str | None = None) -> list[Entry]:
        return self.index.entries(model)

    def load(self, entry_id: str, model: nn.Module, tokenizer: Any) -> Session | None:
        """The stored session, verified; None when absent or when it failed verification (then it
        is quarantined: the caller recomputes it if it can)."""
        entry = self.get(entry_id)
        if entry is None:
            return None
        folder = self.blobs / entry.id
        if not folder.is_dir():  # deleted by another process between its row and its folder
            self.index.remove(entry.id)
            return None
        try:
            session = load_session(model, tokenizer, folder)
        except KVTrimError as err:
            self._quarantine(entry.id, str(err))
            return None
        self.index.touch(entry.id)
        return session

    def _quarantine(self, entry_id: str, reason: str) -> None:
        target = self.quarantine_dir / f"{entry_id}-{int(time.time() * 1000)}"
        try:
            os.replace(self.blobs / entry_id, target)
        except OSError:
            shutil.rmtree(self.blobs / entry_id, ignore_errors=True)
        self.index.quarantine(entry_id, reason)
        self.quarantined_here += 1
        log.error("store: entry %s failed verification and was quarantined: %s", entry_id, reason)

    # --- writing ------------------------------------------------------------------------------

    def put(self, entry_id: str, session: Session, model_fingerprint: str, spec: str) -> Entry:
        """Store ``session`` under ``entry_id`` (kept as it is when another process stored it first)."""
        check_id(entry_id)
        folder = self.blobs / entry_id
        staging = self.tmp / uuid.uuid4().hex
        try:
            session.save(staging)  # complete and fsynced once it exists
            try:
                os.rename(staging, folder)
            except OSError:  # already there (the same content: the id is its hash)
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        now = time.time()
        stats = session.stats
        entry = Entry(
            id=entry_id,
            model=model_fingerprint,
            spec=spec,
            n_tokens=session.context_length,
            kv_bytes=stats.kv_bytes_after,
            kv_bytes_full=stats.kv_bytes_before,
            disk_bytes=_folder_bytes(folder),
            layout=json.dumps(dataclasses.asdict(session.layout)),
            created=now,
            last_used=now,
        )
        self.index.add(entry)
        self._evict(keep=entry_id)
        return entry

    def delete(self, entry_id: str) -> bool:
        """Remove an entry (its row first, so nobody finds a half-deleted folder); False if absent."""
        removed = self.index.remove(check_id(entry_id))
        shutil.rmtree(self.blobs / entry_id, ignore_errors=True)
        return removed

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        while self.index.total_bytes() > self.max_bytes:
            victim = self.index.least_recently_used(exclude=keep)
            if victim is None:
                break
            log.info("store: evicting %s (least recently used, %d bytes)", victim.id, victim.disk_bytes)
            self.delete(victim.id)

    def total_bytes(self) -> int:
        return self.index.total_bytes()

    def quarantined_total(self) -> int:
        return self.index.quarantined_count()

    def close(self) -> None:
        self.index.close()
