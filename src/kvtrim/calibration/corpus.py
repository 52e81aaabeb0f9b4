"""The text calibration runs on: the prose bundled with kvtrim (and, for the learned surrogates,
generated record-like text), cut into token windows."""

from __future__ import annotations

import itertools
from importlib import resources
from typing import Any

from torch import nn

from kvtrim.core.errors import KVTrimError
from kvtrim.models.adapters import text_config


def bundled_texts() -> list[str]:
    """The redistributable prose shipped with kvtrim (default calibration corpus)."""
    data = resources.files("kvtrim") / "data"
    return [(data / name).read_text(encoding="utf-8") for name in ("essays.txt", "example.md")]


def surrogate_texts() -> list[str]:
    """What the learned surrogates of KVzip fit on by default: the bundled prose and generated
    records (:mod:`kvtrim.calibration.records`), so that numbers and codes are seen too."""
    from kvtrim.calibration.records import record_text

    return [*bundled_texts(), record_text()]


def calibration_sequences(
    model: nn.Module, tokenizer: Any, texts: list[str], n_sequences: int, seq_len: int
) -> list[list[int]]:
    """Consecutive, non-overlapping token windows of ``texts`` (at most ``n_sequences``), each
    ``seq_len`` tokens long or shorter when the text or the model's window is shorter."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 64:
        raise KVTrimError("Calibration text is too short (need at least 64 tokens).")
    seq_len = min(seq_len, len(ids), int(getattr(text_config(model), "max_position_embeddings", seq_len)))
    starts = list(range(0, len(ids) - seq_len + 1, seq_len))[:n_sequences]
    return [ids[start : start + seq_len] for start in starts]


def calibration_windows(tokenizer: Any, texts: list[str], n_sequences: int, seq_len: int) -> list[str]:
    """Like :func:`calibration_sequences`, as text: each window the exact slice of its source text
    that its tokens cover (from the tokenizer's offsets), so that encoding it again gives about
    the same tokens (decoding ids may not: some tokenizers join tokens with spaces). The windows
    are taken from the texts in turn (the first of each, then the second, ...), so that every
    text is represented however few windows are asked for."""
    per_text: list[list[str]] = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        starts = range(0, len(offsets) - seq_len + 1, seq_len)
        per_text.append([text[offsets[s][0] : offsets[s + seq_len - 1][1]] for s in starts])
    windows = [w for turn in itertools.zip_longest(*per_text) for w in turn if w is not None]
    if not windows:
        raise KVTrimError(f"Calibration text is too short (need at least {seq_len} tokens in one text).")
    return windows[:n_sequences]
