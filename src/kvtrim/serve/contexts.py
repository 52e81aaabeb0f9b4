"""The server's compressed contexts: an in-memory LRU bounded in bytes over the persistent store.

``obtain`` gives the session of a document under a spec: from memory, else from the store (verified
on load), else compressed now and stored. A stored entry that fails verification is quarantined by
the store and recomputed here from the text the request carries, or, for a request naming only its
id, from the layout the index kept; it is never served.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from kvtrim.api import compress
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec
from kvtrim.models.fingerprint import model_fingerprint
from kvtrim.models.prompting import PromptLayout, encode
from kvtrim.sessions import Session
from kvtrim.store import ContextStore, Entry, context_key
from kvtrim.store.store import check_id

log = logging.getLogger("kvtrim.serve")

Source = Literal["memory", "store", "computed"]


@dataclass
class Obtained:
    """A context's session, its id, and where it came from."""

    id: str
    session: Session
    source: Source
    spec: str

    def reused(self) -> Obtained:
        """The same context as seen by a request batched with the one that found it."""
        return Obtained(self.id, self.session, "memory", self.spec)


class ContextNotFound(KVTrimError):
    """No context has this id (never made, deleted, or evicted)."""


class Contexts:
    """The compressed contexts of one model: memory first, then the store, then a new compression."""

    def __init__(self, model: nn.Module, tokenizer: Any, store: ContextStore | None, memory_budget: int):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.memory_budget = memory_budget
        self.fingerprint = model_fingerprint(model)
        self._memory: OrderedDict[str, Session] = OrderedDict()
        self._specs: dict[str, str] = {}
        self._lock = threading.Lock()
        self.counts = {"memory": 0, "store": 0, "computed": 0}

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(s.stats.kv_bytes_after for s in self._memory.values())

    @property
    def bytes_saved(self) -> int:
        with self._lock:
            return sum(s.stats.bytes_saved for s in self._memory.values())

    def key(self, layout: PromptLayout, spec: CompressionSpec) -> tuple[str, list[int]]:
        ids = encode(self.tokenizer, layout.context_text, layout.add_special_tokens)
        return context_key(self.fingerprint, str(spec), ids), ids

    def obtain(self, layout: PromptLayout, spec: CompressionSpec) -> Obtained:
        """The session of ``layout``'s context compressed by ``spec`` (memory, store or computed)."""
        entry_id, _ = self.key(layout, spec)
        found = self._recall(entry_id)
        if found is not None:
            return found
        return self._compute(entry_id, layout, spec)

    def by_id(self, entry_id: str) -> Obtained:
        """The context stored under ``entry_id``; recomputed from its layout if its entry was bad."""
        check_id(entry_id)
        found = self._recall(entry_id)
        if found is not None:
            return found
        entry = self.store.get(entry_id) if self.store is not None else None
        if entry is None or entry.model != self.fingerprint:
            raise ContextNotFound(f"No context {entry_id} for this model.")
        layout = PromptLayout(**json.loads(entry.layout))
        return self._compute(entry_id, layout, CompressionSpec.parse(entry.spec))

    def _recall(self, entry_id: str) -> Obtained | None:
        with self._lock:
            session = self._memory.get(entry_id)
            if session is not None:
                self._memory.move_to_end(entry_id)
                self.counts["memory"] += 1
                return Obtained(entry_id, session, "memory", self._specs[entry_id])
        if self.store is None:
            return None
        entry = self.store.get(entry_id)
        session = None if entry is None else self.store.load(entry_id, self.model, self.tokenizer)
        if session is None or entry is None:
            return None
        self._remember(entry_id, session, entry.spec)
        self.counts["store"] += 1
        return Obtained(entry_id, session, "store", entry.spec)

    def _compute(self, entry_id: str, layout: PromptLayout, spec: CompressionSpec) -> Obtained:
        session = compress(self.model, self.tokenizer, layout, spec=spec)
        if self.store is not None:
            self.store.put(entry_id, session, self.fingerprint, str(spec))
        self._remember(entry_id, session, str(spec))
        self.counts["computed"] += 1
        return Obtained(entry_id, session, "computed", str(spec))

    def _remember(self, entry_id: str, session: Session, spec: str) -> None:
        with self._lock:
            self._memory[entry_id] = session
            self._memory.move_to_end(entry_id)
            self._specs[entry_id] = spec
            held = sum(s.stats.kv_bytes_after for s in self._memory.values())
            while held > self.memory_budget and len(self._memory) > 1:
                old_id, old = self._memory.popitem(last=False)
                self._specs.pop(old_id, None)
                held -= old.stats.kv_bytes_after
                log.info(
                    "serve: dropped context %s from memory (budget %d bytes)", old_id, self.memory_budget
                )

    def forget(self, entry_id: str) -> bool:
        """Remove a context from memory and the store; False if it was in neither."""
        check_id(entry_id)
        with self._lock:
            in_memory = self._memory.pop(entry_id, None) is not None
            self._specs.pop(entry_id, None)
        in_store = self.store.delete(entry_id) if self.store is not None else False
        return in_memory or in_store

    def listing(self) -> list[Entry]:
        return [] if self.store is None else self.store.entries(self.fingerprint)
