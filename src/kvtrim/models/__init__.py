"""Models: loading (hub id, directory, GGUF, embedded default), per-architecture internals,
prompt layout, and the one forward every prefill and decoding step goes through."""

from kvtrim.models.adapters import (
    attention_modules,
    check_supported,
    has_sliding_layers,
    max_context,
    queries_from_projection,
    query_projection,
    rope_function,
    rotary_for,
    text_config,
)
from kvtrim.models.fingerprint import model_fingerprint
from kvtrim.models.forward import forward, new_cache
from kvtrim.models.loading import default_model_path, load_model
from kvtrim.models.prompting import PromptLayout, encode, encode_context, layout_for

__all__ = [
    "PromptLayout",
    "attention_modules",
    "check_supported",
    "default_model_path",
    "encode",
    "encode_context",
    "forward",
    "has_sliding_layers",
    "layout_for",
    "load_model",
    "max_context",
    "model_fingerprint",
    "new_cache",
    "queries_from_projection",
    "query_projection",
    "rope_function",
    "rotary_for",
    "text_config",
]
