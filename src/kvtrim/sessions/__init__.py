"""Sessions: compressed contexts ready for questions — one context, or a left-padded batch."""

from kvtrim.sessions.answer import Answer
from kvtrim.sessions.batch import BatchSession
from kvtrim.sessions.load import load_session
from kvtrim.sessions.session import Session

__all__ = ["Answer", "BatchSession", "Session", "load_session"]
