"""What the server does with a generation request, apart from HTTP.

``prepare`` checks a request and lays out its prompt on the event loop (cheap: tokenizing); the
model work (finding or compressing the context, decoding) runs later as a job on the model worker
(:mod:`kvtrim.serve.worker`), which streams text pieces and ends with the usage figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from kvtrim.cache.serialize import cache_tensors, restore_cache
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec
from kvtrim.generation import pad_token_id, stop_token_ids
from kvtrim.models.adapters import max_context, model_device
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import PromptLayout, encode
from kvtrim.serve.contexts import ContextNotFound, Contexts, Obtained
from kvtrim.serve.conversation import Prompt, chat_prompt, completion_prompt
from kvtrim.serve.decoding import Sampling, TextStream, generate, generate_batch
from kvtrim.serve.metrics import Metrics
from kvtrim.serve.schemas import ChatRequest, CompletionRequest, GenerationFields
from kvtrim.serve.worker import Job
from kvtrim.strategies.planner import plan


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings (``kvtrim serve --help`` describes each)."""

    model_name: str
    spec: CompressionSpec
    min_context_tokens: int = 256
    default_max_tokens: int = 256
    memory_budget: int = 2 << 30
    queue_size: int = 16
    #: requests on one context decoded together (dense caches only); 1 runs them one by one
    max_batch: int = 8
    request_timeout_s: float = 300.0


@dataclass(frozen=True)
class Prepared:
    """A checked request, ready to run: its context (compressed) and the tokens after it."""

    layout: PromptLayout | None  # the context to find or compress; None: prefill all of rest_ids
    context_id: str | None
    spec: CompressionSpec
    context_tokens: int
    rest_ids: list[int]
    sampling: Sampling
    stops: list[str]
    #: the id of the context (computed or stored) this request answers from; None: plain prefill
    key: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + len(self.rest_ids)


def check_spec(text: str) -> CompressionSpec:
    """A spec the server can serve: parsed, planned, and storable."""
    spec = CompressionSpec.parse(text)
    plan(spec)  # every combination check, before any work
    if spec.query_aware:
        raise KVTrimError(
            "The server compresses a document before its questions: query-aware specs do not apply."
        )
    if spec.decode_budget is not None:
        raise KVTrimError("Specs that evict while decoding cannot be stored: drop decode-budget.")
    return spec


class Service:
    """The model, its contexts and the figures of one server."""

    def __init__(self, model: nn.Module, tokenizer: Any, contexts: Contexts, config: ServeConfig):
        self.model, self.tokenizer, self.contexts, self.config = model, tokenizer, contexts, config
        self.metrics = Metrics()
        self.window = max_context(model)
        self.stop_ids = stop_token_ids(model, tokenizer)

    # --- preparing ------------------------------------------------------------------------------

    def prepare_chat(self, request: ChatRequest) -> Prepared:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        options = request.kvtrim
        if options is not None and options.context_id is not None:
            return self._prepare_stored(request, options.context_id, messages)
        return self._prepare(request, chat_prompt(self.tokenizer, messages))

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        options = request.kvtrim
        if options is not None and options.context_id is not None:
            entry_layout = self._stored_layout(options.context_id)
            layout = PromptLayout(entry_layout.context_text, question_suffix="", add_special_tokens=True)
            return self._prepare(request, Prompt(layout, request.prompt), context_id=options.context_id)
        return self._prepare(request, completion_prompt(self.tokenizer, request.prompt))

    def _prepare_stored(
        self, request: ChatRequest, context_id: str, messages: list[dict[str, str]]
    ) -> Prepared:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise KVTrimError(
                "With kvtrim.context_id, send only the new user message: the context holds the rest."
            )
        layout = self._stored_layout(context_id)
        return self._prepare(
            request, Prompt(layout, layout.question_text(messages[0]["content"])), context_id=context_id
        )

    def _stored_layout(self, context_id: str) -> PromptLayout:
        store = self.contexts.store
        entry = store.get(context_id) if store is not None else None
        if entry is None or entry.model != self.contexts.fingerprint:
            raise ContextNotFound(f"No context {context_id} for this model.")
        return PromptLayout(**json.loads(entry.layout))

    def _prepare(self, request: GenerationFields, prompt: Prompt, context_id: str | None = None) -> Prepared:
        options = request.kvtrim
        spec = self.config.spec if options is None or options.spec is None else check_spec(options.spec)
        layout = prompt.context
        context_ids: list[int] = []
        if layout is not None:
            context_ids = encode(self.tokenizer, layout.context_text, layout.add_special_tokens)
        rest_ids = encode(self.tokenizer, prompt.rest, add_special_tokens=layout is None)
        if context_id is None and layout is not None and len(context_ids) < self.config.min_context_tokens:
            layout, rest_ids, context_ids = None, context_ids + rest_ids, []  # too short to be worth storing
        prompt_tokens = len(context_ids) + len(rest_ids)
        room = self.window - prompt_tokens
        limit = request.token_limit() if hasattr(request, "token_limit") else request.max_tokens
        if room < 1 or (limit is not None and limit > room):
            raise KVTrimError(
                f"The prompt ({prompt_tokens} tokens) and max_tokens ({limit}) exceed the model's window "
                f"of {self.window} tokens."
            )
        sampling = Sampling(
            max_new_tokens=limit or min(self.config.default_max_tokens, room),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
        )
        key = context_id
        if key is None and layout is not None:
            key = self.contexts.key(layout, spec)[0]
        return Prepared(layout, context_id, spec, len(context_ids), rest_ids, sampling, request.stops(), key)

    # --- running ------------------------------------------------------------------------------

    def run_one(self, job: Job) -> None:
        """The model work of one request: find or compress its context, then decode after it."""
        prepared: Prepared = job.payload
        obtained = self._context(prepared)
        if obtained is None:
            cache, start = new_cache(self.model), 0
            self.metrics.prefill_tokens.inc(len(prepared.rest_ids))
        else:
            cache, start = obtained.session.cache, obtained.session.first_position
        stream = TextStream(self.tokenizer, prepared.stops)
        produced = 0
        tokens = generate(
            self.model, cache, start, prepared.rest_ids, prepared.sampling, self.stop_ids, job.cancelled
        )
        try:
            for token in tokens:
                produced += 1
                if produced == 1:
                    self.metrics.first_token.observe(time.perf_counter() - job.arrived)
                piece = stream.push(token)
                if piece:
                    job.emit(("text", piece))
                if stream.stopped:
                    break
        finally:
            tokens.close()  # puts the cache back
        self._finish(job, prepared, obtained, stream, produced)

    def run_batch(self, jobs: Sequence[Job]) -> None:
        """Jobs answering from one context, decoded together (one forward per step for all).

        Only a cache of dense layers is copied into a batch; any other runs the jobs one by one."""
        prepared: list[Prepared] = [job.payload for job in jobs]
        obtained = self._context(prepared[0])
        assert obtained is not None
        batched = repeated_rows(self.model, obtained.session.cache, len(jobs))
        if batched is None:
            for job in jobs:
                job.run(job.emit, job.cancelled)
            return
        self.metrics.batched.inc(len(jobs))
        for p in prepared[1:]:
            self.metrics.contexts.labels("memory").inc()
            self.metrics.prefill_tokens.inc(len(p.rest_ids))
        streams = [TextStream(self.tokenizer, p.stops) for p in prepared]
        produced, first = [0] * len(jobs), [True] * len(jobs)
        ended: set[int] = set()

        def finished(row: int) -> bool:
            return jobs[row].cancelled() or streams[row].stopped

        rows = generate_batch(
            self.model,
            batched,
            obtained.session.first_position,
            [p.rest_ids for p in prepared],
            [p.sampling for p in prepared],
            self.stop_ids,
            finished,
            pad_token_id(self.tokenizer),
        )
        for row, token in rows:
            job = jobs[row]
            if token is None:
                ended.add(row)
                self._finish(
                    job,
                    prepared[row],
                    obtained if row == 0 else obtained.reused(),
                    streams[row],
                    produced[row],
                )
                continue
            produced[row] += 1
            if first[row]:
                self.metrics.first_token.observe(time.perf_counter() - job.arrived)
                first[row] = False
            piece = streams[row].push(token)
            if piece:
                job.emit(("text", piece))
        for row in set(range(len(jobs))) - ended:
            self._finish(
                jobs[row],
                prepared[row],
                obtained if row == 0 else obtained.reused(),
                streams[row],
                produced[row],
            )

    def _finish(
        self, job: Job, prepared: Prepared, obtained: Obtained | None, stream: TextStream, produced: int
    ) -> None:
        """A request's last events: the held-back text and its usage, or its cancellation."""
        if job.cancelled():
            self.count_cancelled(job)
            job.emit(("cancelled", None))
            return
        tail = stream.finish()
        if tail:
            job.emit(("text", tail))
        limit_hit = produced >= prepared.sampling.max_new_tokens and not stream.stopped
        job.emit(("usage", self._usage(prepared, obtained, produced, "length" if limit_hit else "stop")))

    def count_cancelled(self, job: Job) -> None:
        self.metrics.cancelled.labels("timeout" if job.timed_out() else "disconnected").inc()

    def _context(self, prepared: Prepared) -> Obtained | None:
        if prepared.context_id is not None:
            obtained = self.contexts.by_id(prepared.context_id)
        elif prepared.layout is not None:
            obtained = self.contexts.obtain(prepared.layout, prepared.spec)
        else:
            return None
        self.metrics.contexts.labels(obtained.source).inc()
        if obtained.source == "computed":
            self.metrics.prefill_tokens.inc(obtained.session.context_length)
        self.metrics.prefill_tokens.inc(len(prepared.rest_ids))
        return obtained

    def _usage(
        self, prepared: Prepared, obtained: Obtained | None, produced: int, finish: str
    ) -> dict[str, Any]:
        cached = 0 if obtained is None or obtained.source == "computed" else prepared.context_tokens
        self.metrics.prompt_tokens.inc(prepared.prompt_tokens)
        self.metrics.cached_tokens.inc(cached)
        self.metrics.completion_tokens.inc(produced)
        usage: dict[str, Any] = {
            "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": produced,
            "total_tokens": prepared.prompt_tokens + produced,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if obtained is not None:
            stats = obtained.session.stats
            usage["kvtrim"] = {
                "context_id": obtained.id,
                "spec": obtained.spec,
                "source": obtained.source,
                "context_tokens": prepared.context_tokens,
                "kv_bytes_before": stats.kv_bytes_before,
                "kv_bytes_after": stats.kv_bytes_after,
            }
        return {"usage": usage, "finish_reason": finish}

    def refresh_gauges(self) -> None:
        """Set the gauges from the state now (called at each scrape)."""
        m, contexts = self.metrics, self.contexts
        m.kv_bytes_held.set(contexts.bytes_held)
        m.kv_bytes_saved.set(contexts.bytes_saved)
        store = contexts.store
        if store is not None:
            m.quarantined.set(store.quarantined_total())
            m.store_bytes.set(store.total_bytes())
            m.store_entries.set(len(contexts.listing()))


def repeated_rows(model: nn.Module, cache: object, rows: int) -> object | None:
    """A copy of a one-row ``cache`` with ``rows`` identical rows, or None unless every layer is
    dense (ragged heads, pruned channels and sliding windows are not batched)."""
    tensors, layers = cache_tensors(cache)
    if any(meta["kind"] != "dense" for meta in layers):
        return None
    copies = {name: t.expand(rows, *t.shape[1:]).contiguous() for name, t in tensors.items()}  # (rows, ...)
    return restore_cache(new_cache(model), copies, layers, model_device(model))
