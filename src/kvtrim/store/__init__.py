"""A persistent store of compressed contexts: content-addressed folders indexed by SQLite."""

from kvtrim.store.index import Entry
from kvtrim.store.store import ContextStore, context_key

__all__ = ["ContextStore", "Entry", "context_key"]
