"""``kvtrim.load_session``: a saved session back on a model (see :mod:`kvtrim.sessions.stored`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kvtrim.sessions.session import Session
from kvtrim.sessions.stored import read_session


def load_session(model: nn.Module, tokenizer: Any, path: str | Path) -> Session:
    """The session ``Session.save`` wrote to ``path``, checked against ``model`` and ``tokenizer``
    and its checksums before anything is built; it answers exactly as the saved one."""
    return Session(model=model, tokenizer=tokenizer, **read_session(model, tokenizer, path))
