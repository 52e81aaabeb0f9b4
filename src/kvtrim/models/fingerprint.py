"""A short identity of a model's architecture and weights: calibration artefacts are keyed by it,
so two models never share one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from kvtrim.models.adapters import attention_modules, query_projection, text_config


def model_fingerprint(model: nn.Module) -> str:
    """``<name>-<12 hex digits>`` from the config and the first weights of the first query projection."""
    cfg = text_config(model)
    digest = hashlib.sha1()
    digest.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    first_proj, _ = query_projection(attention_modules(model)[0])
    digest.update(first_proj.weight.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    name = Path(str(getattr(cfg, "_name_or_path", "") or cfg.model_type)).name.replace(" ", "_")
    return f"{name[:60]}-{digest.hexdigest()[:12]}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """12 hex digits from the vocabulary, the special tokens and the chat template: two tokenizers
    that could turn one text into different ids never share it."""
    digest = hashlib.sha1()
    vocab = sorted(tokenizer.get_vocab().items())
    special = getattr(tokenizer, "special_tokens_map", {})
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps([type(tokenizer).__name__, vocab, special, template], default=str).encode())
    return digest.hexdigest()[:12]
