"""A plan: a spec resolved into its scorer and budget, the strategy that runs it, and the schedule
its engine uses. Made only by :mod:`kvtrim.strategies.planner`, which checks the combination."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtrim.attention.interface import enable
from kvtrim.budgets.base import Budget
from kvtrim.cache.layers import layer_tokens, sliding_bytes
from kvtrim.core.spec import CompressionSpec
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.eviction import PositionTracker, Selector
from kvtrim.models.prompting import PromptLayout
from kvtrim.schedules import AcrossLayers, AfterPrefill, Chunked, DecodingSchedule, Schedule
from kvtrim.scorers.base import Scorer
from kvtrim.sessions.session import Session


@dataclass(frozen=True)
class Plan:
    """How one compression runs: ``run(model, tokenizer, context(s), plan, **options)`` makes its session."""

    spec: CompressionSpec
    scorer: Scorer
    budget: Budget
    run: Callable[..., Any]
    #: whether the model must run kvtrim's attention function (ragged heads, per-layer lengths,
    #: pruned channels)
    kvtrim_attention: bool

    def selector(self, n_tokens: int | None = None) -> Selector:
        """Chunked prefill evicts down to the *final* budget after every chunk: a fixed token count."""
        budget = self.budget
        if self.spec.chunk_size is not None:
            budget = budget.per_chunk(n_tokens or 0, self.spec.ratio) or budget
        return Selector(self.scorer, budget, self.spec.ratio, merge=self.spec.evicted == "merge")

    def schedule(self, n_tokens: int | None = None) -> Schedule:
        """The engine's schedule for a context of ``n_tokens`` (after-prefill, chunked, decoding)."""
        spec = self.spec
        selector = self.selector(n_tokens)
        evicts_again = spec.chunk_size is not None or spec.decode_budget is not None
        positions = PositionTracker() if evicts_again else None
        if spec.chunk_size is not None:
            prefill: Schedule = Chunked(selector, positions)
        elif self.budget.spans_layers:
            prefill = AcrossLayers(selector)
        else:
            prefill = AfterPrefill(
                selector,
                positions,
                key_channels=spec.key_channels,
                rerotate=spec.rerotate,
                windows=spec.windows,
            )
        if spec.decode_budget is None:
            return prefill
        assert positions is not None
        return DecodingSchedule(
            prefill,
            self.scorer,
            positions,
            spec.decode_budget,
            spec.evict_every,
            evicted=spec.evicted,
        )

    def session(
        self,
        model: Any,
        tokenizer: Any,
        cache: Any,
        layout: PromptLayout,
        context_length: int,
        stats: CompressionStats,
        prefill_s: float,
        **extra: Any,
    ) -> Session:
        """The session a compression by this plan left (``extra``: its question, its compressor)."""
        stats.kv_bytes_sliding = sliding_bytes(cache)
        # re-rotated keys sit at 0..K−1: the next token takes position K, as after any K-token prefix
        next_position = layer_tokens(cache.layers[0]) if self.spec.rerotate else None
        return Session(
            model=model,
            tokenizer=tokenizer,
            cache=cache,
            layout=layout,
            context_length=context_length,
            method=self.scorer.name,
            ratio=self.spec.ratio,
            stats=stats,
            prefill_s=prefill_s,
            budget=self.budget.name,
            spec=self.spec,
            next_position=next_position,
            **extra,
        )

    def prepare(self, model: Any, tokenizer: Any) -> None:
        """Ready the model (kvtrim's attention where the plan needs it), the scorer and the budget
        (model-specific data such as calibration, computed once and cached)."""
        if self.kvtrim_attention:
            enable(model)
        self.scorer.setup(model, tokenizer)
        self.budget.setup(model, tokenizer)
