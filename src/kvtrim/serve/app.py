"""The HTTP face of the server: OpenAI's chat and text completions, contexts, health and metrics.

Every error is an OpenAI-style object (``{"error": {"message", "type", "param", "code"}}``): 400 for
a bad spec, prompt or context, 401 without the API key, 404 for an unknown model or context, 413
for an oversized body, 422 for a body that does not parse, 429 (with ``Retry-After``) when the
model's queue is full, 504 past the request timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtrim.core.errors import KVTrimError
from kvtrim.core.version import __version__
from kvtrim.models.prompting import layout_for
from kvtrim.serve.contexts import ContextNotFound
from kvtrim.serve.conversation import leading_layout
from kvtrim.serve.errors import BodyLimit, error_response
from kvtrim.serve.schemas import ChatRequest, CompletionRequest, ContextRequest
from kvtrim.serve.service import Prepared, Service, check_spec
from kvtrim.serve.worker import Job, ModelWorker, QueueFull
from kvtrim.store.store import check_id


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def create_app(service: Service, api_key: str | None = None, max_request_bytes: int = 8 << 20) -> Any:
    """The ASGI app serving ``service`` (wrapped in the body-size guard)."""
    worker = ModelWorker(
        service.config.queue_size, service.config.max_batch, service.run_batch, service.count_cancelled
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="kvtrim", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service, app.state.worker = service, worker
    _install_errors(app, service)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "Missing or wrong API key (Authorization: Bearer ...).", "invalid_api_key")

    guard = [Depends(authorised)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.config.model_name, "queue": worker.waiting}

    @app.get("/metrics", dependencies=guard)
    async def metrics() -> Response:
        service.refresh_gauges()
        service.metrics.queue_depth.set(worker.waiting)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guard)
    async def models() -> dict[str, Any]:
        card = {"id": service.config.model_name, "object": "model", "created": 0, "owned_by": "kvtrim"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat(body: ChatRequest) -> Response:
        return await _generation(service, worker, body, service.prepare_chat, chat=True)

    @app.post("/v1/completions", dependencies=guard)
    async def completions(body: CompletionRequest) -> Response:
        return await _generation(service, worker, body, service.prepare_completion, chat=False)

    @app.post("/v1/contexts", dependencies=guard)
    async def make_context(body: ContextRequest) -> dict[str, Any]:
        layout = _context_layout(service, body)
        spec = service.config.spec if body.spec is None else _prepared(lambda: check_spec(body.spec or ""))
        obtained = await _run_on_worker(worker, service, lambda: service.contexts.obtain(layout, spec))
        return _context_card(service, obtained.id, obtained.source)

    @app.get("/v1/contexts", dependencies=guard)
    async def list_contexts() -> dict[str, Any]:
        return {"object": "list", "data": [_entry_card(e) for e in service.contexts.listing()]}

    @app.get("/v1/contexts/{context_id}", dependencies=guard)
    async def get_context(context_id: str) -> dict[str, Any]:
        entry = _entry(service, context_id)
        return _entry_card(entry)

    @app.delete("/v1/contexts/{context_id}", dependencies=guard)
    async def delete_context(context_id: str) -> dict[str, Any]:
        _checked_id(context_id)
        if not service.contexts.forget(context_id):
            raise ApiError(404, f"No context {context_id}.", "context_not_found")
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    return BodyLimit(app, max_request_bytes)


# --- requests ---------------------------------------------------------------------------------


def _check_model(service: Service, name: str) -> None:
    if name != service.config.model_name:
        raise ApiError(
            404,
            f"The model {name!r} does not exist here; this server serves {service.config.model_name!r}.",
            "model_not_found",
        )


def _checked_id(context_id: str) -> str:
    try:
        return check_id(context_id)
    except KVTrimError as err:
        raise ApiError(400, str(err), "invalid_context_id") from err


def _prepared(make: Any) -> Any:
    try:
        return make()
    except ContextNotFound as err:
        raise ApiError(404, str(err), "context_not_found") from err
    except KVTrimError as err:
        raise ApiError(400, str(err)) from err


def _context_layout(service: Service, body: ContextRequest) -> Any:
    if (body.text is None) == (body.messages is None):
        raise ApiError(400, "Give the context as exactly one of text or messages.")
    if body.text is not None:
        if not body.text.strip():
            raise ApiError(400, "text is empty.")
        return layout_for(service.tokenizer, body.text)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages or []]
    if not messages:
        raise ApiError(400, "messages is empty.")
    return _prepared(lambda: leading_layout(service.tokenizer, messages))


def _entry(service: Service, context_id: str) -> Any:
    _checked_id(context_id)
    store = service.contexts.store
    entry = store.get(context_id) if store is not None else None
    if entry is None or entry.model != service.contexts.fingerprint:
        raise ApiError(404, f"No context {context_id}.", "context_not_found")
    return entry


def _entry_card(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "context",
        "spec": entry.spec,
        "tokens": entry.n_tokens,
        "kv_bytes": entry.kv_bytes,
        "kv_bytes_full": entry.kv_bytes_full,
        "disk_bytes": entry.disk_bytes,
        "created": int(entry.created),
        "last_used": int(entry.last_used),
    }


def _context_card(service: Service, context_id: str, source: str) -> dict[str, Any]:
    card = _entry_card(_entry(service, context_id))
    card["source"] = source
    return card


async def _run_on_worker(worker: ModelWorker, service: Service, work: Any) -> Any:
    """Run ``work()`` on the model worker (it uses the model) and return its result."""
    result: dict[str, Any] = {}

    def run(emit: Any, cancelled: Any) -> None:
        result["value"] = work()

    job = _submit(worker, service, run)
    async for kind, payload in _events(job):
        if kind == "error":
            raise _api_error(payload)
        if kind == "cancelled":
            raise ApiError(504, "The request timed out.", "timeout")
    return result["value"]


def _submit(worker: ModelWorker, service: Service, run: Any, prepared: Prepared | None = None) -> Job:
    job = Job(
        run=run,
        loop=asyncio.get_running_loop(),
        deadline=time.monotonic() + service.config.request_timeout_s,
        batch_key=None if prepared is None else prepared.key,
        payload=prepared,
    )
    try:
        return worker.submit(job)
    except QueueFull as err:
        service.metrics.rejected.labels("queue_full").inc()
        raise ApiError(
            429,
            "The server is busy: its request queue is full. Retry later.",
            "queue_full",
            headers={"Retry-After": "1"},
        ) from err


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    while True:
        kind, payload = await job.events.get()
        if kind == "end":
            return
        yield kind, payload
        if kind == "cancelled":
            return


def _api_error(err: Exception) -> ApiError:
    if isinstance(err, ContextNotFound):
        return ApiError(404, str(err), "context_not_found")
    if isinstance(err, KVTrimError):
        return ApiError(400, str(err))
    return ApiError(500, f"Internal error: {type(err).__name__}: {err}")


async def _generation(
    service: Service, worker: ModelWorker, body: Any, prepare: Any, *, chat: bool
) -> Response:
    """Check a chat or text completion request, queue it, and answer it (streamed or whole)."""
    _check_model(service, body.model)
    prepared = _prepared(lambda: prepare(body))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(
        service, worker, prepared, body.model, chat=chat, stream=body.stream, include_usage=include_usage
    )


async def _answer(
    service: Service,
    worker: ModelWorker,
    prepared: Prepared,
    model: str,
    *,
    chat: bool,
    stream: bool,
    include_usage: bool,
) -> Response:
    job = _submit(worker, service, lambda emit, cancelled: service.run_one(job), prepared)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if stream:
        chunks = _stream(job, ident, created, model, chat, include_usage)
        return StreamingResponse(
            chunks,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    pieces: list[str] = []
    done: dict[str, Any] = {}
    try:
        async for kind, payload in _events(job):
            if kind == "text":
                pieces.append(payload)
            elif kind == "usage":
                done = payload
            elif kind == "error":
                raise _api_error(payload)
            elif kind == "cancelled":
                raise ApiError(504, "The request timed out.", "timeout")
    except asyncio.CancelledError:
        job.cancel()  # the client went away
        raise
    text = "".join(pieces)
    choice: dict[str, Any] = {"index": 0, "finish_reason": done["finish_reason"]}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": done["usage"],
        }
    )


async def _stream(
    job: Job, ident: str, created: int, model: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        body: dict[str, Any] = {
            "id": ident,
            "object": kind_name,
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def piece(text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": text or "", "finish_reason": finish}

    try:
        if chat:
            yield chunk([piece("", first=True)])
        async for kind, payload in _events(job):
            if kind == "text":
                yield chunk([piece(payload)])
            elif kind == "usage":
                yield chunk([piece(None, payload["finish_reason"])])
                if include_usage:
                    yield chunk([], payload["usage"])
            elif kind in ("error", "cancelled"):
                err = (
                    _api_error(payload)
                    if kind == "error"
                    else ApiError(504, "The request timed out.", "timeout")
                )
                yield f"data: {json.dumps({'error': {'message': err.message, 'code': err.code}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a client that disconnects stops its generation at the next token


def _install_errors(app: FastAPI, service: Service) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid"))
        )
        return error_response(422, message, "invalid_request", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response
