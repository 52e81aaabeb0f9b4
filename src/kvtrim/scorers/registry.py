"""The scorer registry: a method name in the API and CLI is a registered scorer with default options.

Filled by :mod:`kvtrim.scorers` (one line per scorer); looked up at call time, so a scorer that
builds another (CriticalKV's base) can use :func:`make_scorer` without importing the package.
"""

from __future__ import annotations

from typing import Any

from kvtrim.core.errors import KVTrimError
from kvtrim.core.options import build
from kvtrim.core.spec import parse_named
from kvtrim.scorers.base import Scorer

SCORERS: dict[str, type[Scorer]] = {}


def register(*classes: type[Scorer]) -> None:
    for cls in classes:
        SCORERS[cls.name] = cls


def make_scorer(method: str | Scorer, **options: Any) -> Scorer:
    """Build a scorer from its name and options (or pass a ready :class:`Scorer` through).

    The name may carry options itself (``expected-attention:epsilon=0.01``, see
    :mod:`kvtrim.core.spec`); keyword options come on top of them.
    """
    if isinstance(method, Scorer):
        if options:
            raise KVTrimError("Options cannot be given together with a ready Scorer instance.")
        return method
    name, spec_options = parse_named(method)
    cls = SCORERS.get(name)
    if cls is None:
        raise KVTrimError(f"Unknown method {name!r}. Available: {', '.join(SCORERS)} (see `kvtrim methods`).")
    return build(cls, f"method {name!r}", {**spec_options, **options})
