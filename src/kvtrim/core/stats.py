"""The figures of one compression, read from the real tensors (bytes are storage bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompressionStats:
    """Figures of the last compression, from the real tensors (bytes are storage bytes)."""

    kv_tokens_before: int = 0
    kv_tokens_after: int = 0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    compress_s: float = 0.0
    #: largest KV cache held at any moment of the compression (bytes)
    kv_bytes_peak: int = 0
    layers_compressed: int = 0
    #: bytes of kv_bytes_after held by sliding-window layers (kept whole within their window)
    kv_bytes_sliding: int = 0
    per_layer_kept: list[float] = field(default_factory=list)
    #: (layer, head) evictions made while decoding, counted per layer
    decode_evictions: int = 0
    decode_evict_s: float = 0.0

    def add_layer(self, bytes_before: int, bytes_after: int, seq: int, keep: float, heads: int) -> None:
        """Count one layer: ``seq`` pairs per head before, ``keep`` after (a mean if ragged)."""
        self.kv_bytes_before += bytes_before
        self.kv_bytes_after += bytes_after
        self.kv_tokens_before += seq * heads
        self.kv_tokens_after += round(keep * heads)
        self.per_layer_kept.append(keep)

    @property
    def bytes_saved(self) -> int:
        return self.kv_bytes_before - self.kv_bytes_after
