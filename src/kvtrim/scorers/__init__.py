"""Scorers: which KV pairs matter. One score per (batch, kv-head, position), higher = keep.

A published method is one file here plus one line in :func:`register` below.
"""

from kvtrim.scorers.base import LayerView, Scorer
from kvtrim.scorers.capkv import CAPKV
from kvtrim.scorers.chunkkv import ChunkKV
from kvtrim.scorers.chunkkv_entropy import EntropyGatedChunkKV
from kvtrim.scorers.compactor import Compactor
from kvtrim.scorers.critical import CriticalKV
from kvtrim.scorers.cur import CUR
from kvtrim.scorers.expected_attention import ExpectedAttention, ExpectedAttentionCalibrated
from kvtrim.scorers.fastkvzip import FastKVzip
from kvtrim.scorers.finch import FINCH
from kvtrim.scorers.keydiff import KeyDiff
from kvtrim.scorers.kvgrad import KVgrad
from kvtrim.scorers.kvzap import KVzap
from kvtrim.scorers.kvzip import KVzip
from kvtrim.scorers.lagkv import LagKV
from kvtrim.scorers.leverage import Leverage
from kvtrim.scorers.noncausal import NonCausalAttention
from kvtrim.scorers.observed_attention import ObservedAttention
from kvtrim.scorers.qfilters import QFilters
from kvtrim.scorers.registry import SCORERS, make_scorer, register
from kvtrim.scorers.simple import KNorm, NoEviction, RandomScorer, StreamingLLM
from kvtrim.scorers.snapkv import SnapKV, SnapKVQueryAware
from kvtrim.scorers.tova import TOVA

register(
    NoEviction,
    KNorm,
    ExpectedAttention,
    ExpectedAttentionCalibrated,
    QFilters,
    RandomScorer,
    StreamingLLM,
    SnapKV,
    SnapKVQueryAware,
    FINCH,
    TOVA,
    ObservedAttention,
    KeyDiff,
    LagKV,
    CUR,
    Leverage,
    NonCausalAttention,
    Compactor,
    CAPKV,
    ChunkKV,
    EntropyGatedChunkKV,
    KVzip,
    KVgrad,
    KVzap,
    FastKVzip,
    CriticalKV,
)

#: every method by name (the registry itself: what ``kvtrim methods`` lists)
METHODS = SCORERS

__all__ = ["METHODS", "SCORERS", "LayerView", "Scorer", "make_scorer"]
