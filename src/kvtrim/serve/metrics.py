"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Counters updated as requests run; gauges read from the server's state at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvtrim_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "kvtrim_request_seconds",
            "Request latency (to the start of the response)",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.first_token = Histogram(
            "kvtrim_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvtrim_prompt_tokens", "Prompt tokens of generation requests", registry=r
        )
        self.cached_tokens = Counter(
            "kvtrim_cached_prompt_tokens",
            "Prompt tokens served from a stored context (no prefill)",
            registry=r,
        )
        self.prefill_tokens = Counter("kvtrim_prefill_tokens", "Tokens run through a prefill", registry=r)
        self.completion_tokens = Counter("kvtrim_completion_tokens", "Generated tokens", registry=r)
        self.contexts = Counter(
            "kvtrim_context_lookups", "Context lookups by where the context came from", ["source"], registry=r
        )
        self.batched = Counter(
            "kvtrim_batched_requests",
            "Requests decoded in a batch with others on the same context",
            registry=r,
        )
        self.cancelled = Counter(
            "kvtrim_cancelled_requests", "Generations stopped early", ["reason"], registry=r
        )
        self.rejected = Counter("kvtrim_rejected", "Requests refused before running", ["reason"], registry=r)
        self.quarantined = Gauge(
            "kvtrim_store_quarantined", "Stored entries that failed verification (whole store)", registry=r
        )
        self.store_bytes = Gauge("kvtrim_store_bytes", "Bytes of the stored contexts on disk", registry=r)
        self.store_entries = Gauge("kvtrim_store_entries", "Stored contexts (this model)", registry=r)
        self.kv_bytes_held = Gauge(
            "kvtrim_kv_bytes_held", "KV cache bytes of the contexts in memory", registry=r
        )
        self.kv_bytes_saved = Gauge(
            "kvtrim_kv_bytes_saved",
            "KV bytes the contexts in memory would hold more uncompressed",
            registry=r,
        )
        self.queue_depth = Gauge(
            "kvtrim_queue_depth", "Generation requests waiting for the model", registry=r
        )
