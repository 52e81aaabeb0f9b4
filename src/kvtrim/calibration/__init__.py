"""Per-model statistics computed locally from text and cached on disk (never downloaded):
Q-Filters, query statistics, DuoAttention's head split, KVzap's score predictor, Fast KVzip's
gates, LU-KV's budget curves."""

from kvtrim.calibration.artefacts import (
    DUO_VERSION,
    QFILTERS_VERSION,
    QUERY_STATS_VERSION,
    duo_heads_path,
    load_or_compute_duo_heads,
    load_or_compute_qfilters,
    load_or_compute_query_stats,
    qfilters_path,
    query_stats_path,
)
from kvtrim.calibration.budget_curves import (
    LUKV_VERSION,
    compute_lukv_curves,
    load_or_compute_lukv,
    lukv_path,
)
from kvtrim.calibration.corpus import bundled_texts, calibration_sequences
from kvtrim.calibration.duo_heads import compute_duo_heads, passkey_prompt
from kvtrim.calibration.gates import FASTKVZIP_VERSION, fastkvzip_path, fit_fastkvzip, load_or_fit_fastkvzip
from kvtrim.calibration.qfilters import compute_qfilters, dominant_direction, orient_filter
from kvtrim.calibration.query_stats import compute_query_stats
from kvtrim.calibration.surrogates import KVZAP_VERSION, fit_kvzap, kvzap_path, load_or_fit_kvzap

__all__ = [
    "DUO_VERSION",
    "FASTKVZIP_VERSION",
    "KVZAP_VERSION",
    "LUKV_VERSION",
    "QFILTERS_VERSION",
    "QUERY_STATS_VERSION",
    "bundled_texts",
    "calibration_sequences",
    "compute_duo_heads",
    "compute_lukv_curves",
    "compute_qfilters",
    "compute_query_stats",
    "dominant_direction",
    "duo_heads_path",
    "fastkvzip_path",
    "fit_fastkvzip",
    "fit_kvzap",
    "kvzap_path",
    "lukv_path",
    "load_or_compute_duo_heads",
    "load_or_compute_lukv",
    "load_or_compute_qfilters",
    "load_or_compute_query_stats",
    "load_or_fit_fastkvzip",
    "load_or_fit_kvzap",
    "orient_filter",
    "passkey_prompt",
    "qfilters_path",
    "query_stats_path",
]
