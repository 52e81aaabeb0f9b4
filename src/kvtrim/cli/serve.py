"""``kvtrim serve``: an OpenAI-compatible HTTP server over a persistent store of compressed contexts."""

from __future__ import annotations

import argparse
import os
import re

from kvtrim.cli.common import MODEL_HELP, positive
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import DEFAULT_SPEC

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text: str) -> int:
    """Bytes from ``123``, ``512M``, ``2G`` or ``1.5GiB``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI-compatible), reusing stored compressed contexts",
        description="Serve chat and text completions (OpenAI's API) from compressed KV caches. The "
        "leading document of a conversation is compressed once, stored on disk (verified on every "
        "load) and reused by every later request on the same document and spec.",
    )
    serve.add_argument("--model", default=None, help=MODEL_HELP)
    serve.add_argument(
        "--spec",
        default=None,
        help=f"the compression of every request (default {DEFAULT_SPEC}); a request may give its "
        "own in kvtrim.spec",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--store", default=None, help="folder of the context store (default: kvtrim's cache/contexts)"
    )
    serve.add_argument(
        "--store-max-bytes",
        type=size,
        default=None,
        help="size limit of the store; least recently used contexts are evicted (e.g. 20G)",
    )
    serve.add_argument(
        "--memory-budget",
        type=size,
        default=size("2G"),
        help="bytes of compressed caches kept loaded in memory (default 2G)",
    )
    serve.add_argument(
        "--min-context-tokens",
        type=positive,
        default=256,
        help="shortest leading document worth compressing and storing (default 256)",
    )
    serve.add_argument(
        "--max-tokens",
        type=positive,
        default=256,
        help="tokens generated when a request gives no max_tokens (default 256)",
    )
    serve.add_argument(
        "--queue-size",
        type=positive,
        default=16,
        help="requests that may wait for the model; more get 429 (default 16)",
    )
    serve.add_argument(
        "--max-batch",
        type=positive,
        default=8,
        help="requests waiting on one context decoded together, one forward per step (default 8; "
        "1: one by one). Only caches of dense layers are batched",
    )
    serve.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take (default 300)"
    )
    serve.add_argument(
        "--max-request-bytes",
        type=size,
        default=size("8M"),
        help="largest request body; larger ones get 413 (default 8M)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY (default: $KVTRIM_API_KEY, else no key)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (default: --model, or smollm2-135m)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from kvtrim.core.files import cache_dir
    from kvtrim.models import load_model
    from kvtrim.serve.app import create_app
    from kvtrim.serve.contexts import Contexts
    from kvtrim.serve.service import ServeConfig, Service, check_spec
    from kvtrim.store import ContextStore
    from kvtrim.strategies.planner import plan

    if not 0 < args.port < 65536:
        raise KVTrimError(f"--port must be in 1..65535, got {args.port}.")
    if args.timeout <= 0:
        raise KVTrimError(f"--timeout must be positive, got {args.timeout}.")
    spec = check_spec(args.spec or DEFAULT_SPEC)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    store = ContextStore(args.store or cache_dir() / "contexts", max_bytes=args.store_max_bytes)
    model, tokenizer = load_model(args.model)
    name = args.served_model_name or args.model or "smollm2-135m"
    config = ServeConfig(
        model_name=name,
        spec=spec,
        min_context_tokens=args.min_context_tokens,
        default_max_tokens=args.max_tokens,
        memory_budget=args.memory_budget,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        request_timeout_s=args.timeout,
    )
    # model-specific data of the spec (calibration, computed once and cached) before any request waits
    plan(spec).prepare(model, tokenizer)
    service = Service(model, tokenizer, Contexts(model, tokenizer, store, args.memory_budget), config)
    api_key = args.api_key or os.environ.get("KVTRIM_API_KEY") or None
    app = create_app(service, api_key=api_key, max_request_bytes=args.max_request_bytes)
    print(
        f"kvtrim serve: {name} with {spec} on http://{args.host}:{args.port}/v1 (store {store.root})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
