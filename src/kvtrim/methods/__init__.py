"""The scorer registry: a method name in the API and CLI is a scorer with default options."""

from __future__ import annotations

from typing import Any

from kvtrim.errors import KVTrimError
from kvtrim.methods.base import LayerView, Scorer
from kvtrim.methods.chunkkv import ChunkKV
from kvtrim.methods.critical import CriticalKV
from kvtrim.methods.cur import CUR
from kvtrim.methods.expected_attention import ExpectedAttention, ExpectedAttentionCalibrated
from kvtrim.methods.keydiff import KeyDiff
from kvtrim.methods.kvzip import KVzip
from kvtrim.methods.lagkv import LagKV
from kvtrim.methods.leverage import Leverage
from kvtrim.methods.observed_attention import ObservedAttention
from kvtrim.methods.qfilters import QFilters
from kvtrim.methods.simple import KNorm, NoEviction, RandomScorer, StreamingLLM
from kvtrim.methods.snapkv import SnapKV, SnapKVQueryAware
from kvtrim.methods.tova import TOVA
from kvtrim.specs import parse_spec

METHODS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        NoEviction,
        KNorm,
        ExpectedAttention,
        ExpectedAttentionCalibrated,
        QFilters,
        RandomScorer,
        StreamingLLM,
        SnapKV,
        SnapKVQueryAware,
        TOVA,
        ObservedAttention,
        KeyDiff,
        LagKV,
        CUR,
        Leverage,
        ChunkKV,
        KVzip,
        CriticalKV,
    )
}


def make_scorer(method: str | Scorer, **options: Any) -> Scorer:
    """Build a scorer from its name and options (or pass a ready :class:`Scorer` through).

    The name may carry options itself (:mod:`kvtrim.specs`): ``expected-attention:epsilon=0.01``;
    keyword options come on top of them.
    """
    if isinstance(method, Scorer):
        if options:
            raise KVTrimError("Options cannot be given together with a ready Scorer instance.")
        return method
    method, spec_options = parse_spec(method)
    options = {**spec_options, **options}
    cls = METHODS.get(method)
    if cls is None:
        raise KVTrimError(
            f"Unknown method {method!r}. Available: {', '.join(METHODS)} (see `kvtrim methods`)."
        )
    try:
        return cls(**options)
    except TypeError as err:
        raise KVTrimError(f"Bad option for method {method!r}: {err}") from err


__all__ = ["METHODS", "LayerView", "Scorer", "make_scorer"]
