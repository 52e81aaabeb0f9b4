"""kvtrim: compress the KV cache of Hugging Face causal LMs with real memory savings, offline.

>>> import kvtrim
>>> model, tokenizer = kvtrim.load_model()          # embedded SmolLM2-135M-Instruct
>>> session = kvtrim.compress(model, tokenizer, context, method="expected-attention", ratio=0.5)
>>> session.ask("Who is the chief keeper?")

The public names are loaded on first use, so ``import kvtrim`` (and ``kvtrim --help``) stays
instant; torch and transformers load with the first name that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec
from kvtrim.core.version import __version__

if TYPE_CHECKING:
    from kvtrim.api import compress, compressing
    from kvtrim.core.stats import CompressionStats
    from kvtrim.engine import Compressor
    from kvtrim.models import load_model
    from kvtrim.schedules import DecodingSchedule
    from kvtrim.scorers import METHODS, LayerView, Scorer, make_scorer
    from kvtrim.sessions import Answer, BatchSession, Session, load_session

#: public name -> module that defines it
_LAZY = {
    "compress": "kvtrim.api",
    "compressing": "kvtrim.api",
    "CompressionStats": "kvtrim.core.stats",
    "Compressor": "kvtrim.engine",
    "load_model": "kvtrim.models",
    "DecodingSchedule": "kvtrim.schedules",
    "METHODS": "kvtrim.scorers",
    "LayerView": "kvtrim.scorers",
    "Scorer": "kvtrim.scorers",
    "make_scorer": "kvtrim.scorers",
    "Answer": "kvtrim.sessions",
    "BatchSession": "kvtrim.sessions",
    "Session": "kvtrim.sessions",
    "load_session": "kvtrim.sessions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtrim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "METHODS",
    "Answer",
    "BatchSession",
    "CompressionSpec",
    "CompressionStats",
    "Compressor",
    "DecodingSchedule",
    "KVTrimError",
    "LayerView",
    "Scorer",
    "Session",
    "__version__",
    "compress",
    "compressing",
    "load_model",
    "load_session",
    "make_scorer",
]
