"""The store's SQLite index (stdlib ``sqlite3``, WAL mode): one row per stored context.

An entry is visible only once its row exists, and the row is written after the entry's folder is
complete, so a crash between the two leaves a folder nobody sees (removed at the next start).
WAL mode and a busy timeout let several server processes on one machine share the index: readers
never block the writer, and writers wait for each other instead of failing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    spec TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    kv_bytes INTEGER NOT NULL,
    kv_bytes_full INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    layout TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used);
CREATE TABLE IF NOT EXISTS quarantined (
    id TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
_COLUMNS = "id, model, spec, n_tokens, kv_bytes, kv_bytes_full, disk_bytes, layout, created, last_used"


@dataclass(frozen=True)
class Entry:
    """One stored context: its id, what made it, its sizes and when it was made and last used."""

    id: str
    model: str
    spec: str
    n_tokens: int
    kv_bytes: int
    kv_bytes_full: int
    disk_bytes: int
    #: the prompt layout (JSON) the context was compressed with: enough to recompute it
    layout: str
    created: float
    last_used: float


class StoreIndex:
    """The rows of one store; every method is one short transaction, safe across threads and processes."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, entry: Entry) -> None:
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.model,
                    entry.spec,
                    entry.n_tokens,
                    entry.kv_bytes,
                    entry.kv_bytes_full,
                    entry.disk_bytes,
                    entry.layout,
                    entry.created,
                    entry.last_used,
                ),
            )

    def get(self, entry_id: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else Entry(*row)

    def touch(self, entry_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE entries SET last_used = ? WHERE id = ?", (time.time(), entry_id))

    def remove(self, entry_id: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount > 0

    def quarantine(self, entry_id: str, reason: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            db.execute(
                "INSERT INTO quarantined (id, at, reason) VALUES (?, ?, ?)", (entry_id, time.time(), reason)
            )

    def entries(self, model: str | None = None) -> list[Entry]:
        query = f"SELECT {_COLUMNS} FROM entries"
        args: tuple[str, ...] = ()
        if model is not None:
            query, args = query + " WHERE model = ?", (model,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created", args).fetchall()
        return [Entry(*row) for row in rows]

    def ids(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM entries")}

    def total_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(disk_bytes), 0) FROM entries").fetchone()[0])

    def least_recently_used(self, exclude: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE id != ? ORDER BY last_used LIMIT 1", (exclude,)
            ).fetchone()
        return None if row is None else Entry(*row)

    def quarantined_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM quarantined").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
