"""DuoAttention's head split (arXiv 2410.10819), calibrated locally on passkey texts.

Every KV head of every full-attention layer is scored by the share of its question-time attention
that reaches back to a passkey planted in the bundled prose, rather than to the sinks and the
recent tokens: retrieval heads look back, streaming heads do not.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrim.core.errors import KVTrimError
from kvtrim.core.hooks import attention_hooks
from kvtrim.models.adapters import (
    full_attention_layers,
    hooked_layers,
    queries_from_projection,
    rope_function,
    text_config,
)
from kvtrim.models.forward import forward, new_cache

DUO_NEEDLE = " The special magic number is {value}. Remember it: the magic number is {value}. "
DUO_QUESTION = "\nWhat is the special magic number mentioned above? The special magic number is"
DUO_VALUES = ("7294031", "4186502", "9051736", "2637418")


def passkey_prompt(
    haystack: list[int],
    needle: list[int],
    question: list[int],
    seq_len: int,
    sinks: int,
    window: int,
    depth: float,
) -> tuple[list[int], int]:
    """``seq_len`` ids: haystack with ``needle`` at ``depth`` of the span between the sinks and the
    recent window, then ``question``. Returns the ids and where the needle starts."""
    context_len = seq_len - len(question)
    room = context_len - window - sinks - len(needle)
    if room < 0 or len(haystack) < context_len:
        raise KVTrimError("Calibration text is too short for the passkey calibration.")
    start = sinks + round(depth * room)
    ids = haystack[:start] + needle + haystack[start : context_len - len(needle)] + question
    return ids, start


def _attention_masses(
    probs: torch.Tensor, span: dict[str, int], sinks: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Needle and local (sinks + each query's recent window) attention mass per query head.

    probs: (H, Q, T) the question queries' attention -> (H,), (H,) in float64.
    """
    seq, n_q = probs.shape[-1], probs.shape[1]
    rows = torch.arange(seq - n_q, seq, device=probs.device)[:, None]  # (Q, 1) query positions
    cols = torch.arange(seq, device=probs.device)[None]  # (1, T)
    needle = (cols >= span["start"]) & (cols < span["end"])  # (1, T)
    local = (cols < sinks) | (cols > rows - window)  # (Q, T)
    return (probs * needle).sum(dim=(1, 2)).double().cpu(), (probs * local).sum(dim=(1, 2)).double().cpu()


def _question_attention(attn: nn.Module, kwargs: dict, projected: torch.Tensor, layer: Any, n_q: int):
    """Softmax attention (H, Q, T) of the last ``n_q`` (question) queries over the layer's keys."""
    q = queries_from_projection(attn, projected)  # (1, H, T, D)
    cos, sin = kwargs["position_embeddings"]
    q = rope_function(attn)(q, q, cos, sin)[0][0, :, -n_q:].float()  # (H, Q, D)
    keys = layer.keys[0].float()  # (Hkv, T, D), post-RoPE
    seq, group = keys.shape[1], q.shape[0] // keys.shape[0]
    keys = keys.repeat_interleave(group, dim=0)  # (H, T, D)
    logits = attn.scaling * q @ keys.transpose(-1, -2)  # (H, Q, T)
    rows = torch.arange(seq - n_q, seq, device=q.device)[:, None]  # (Q, 1) query positions
    cols = torch.arange(seq, device=q.device)[None]  # (1, T)
    return torch.softmax(logits.masked_fill(cols > rows, -torch.inf), dim=-1)  # (H, Q, T)


@torch.inference_mode()
def compute_duo_heads(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    seq_len: int = 2048,
    sinks: int = 64,
    window: int = 256,
    depths: tuple[float, ...] = (0.1, 0.4, 0.7, 1.0),
) -> torch.Tensor:
    """Retrieval score in [0, 1] of every (layer, kv-head): needle / (needle + sinks + recent)
    attention mass of the question's queries, summed over its query heads, its queries and one
    passkey text per depth. Sliding-window layers are never compressed and score 0.

    ``seq_len`` is clipped to the text and the model's window; ``sinks`` and ``window`` to 1/16 and
    1/4 of the context, so that short calibration texts still leave the needle outside both.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    haystack = [token for text in texts for token in encode(text)]
    question = encode(DUO_QUESTION)
    max_positions = int(getattr(text_config(model), "max_position_embeddings", seq_len))
    seq_len = min(seq_len, len(haystack) + len(question), max_positions)
    context_len = seq_len - len(question)
    sinks, window = min(sinks, context_len // 16), min(window, context_len // 4)
    layers = hooked_layers(model)
    full = full_attention_layers(model) or [True] * len(layers)
    n_kv = text_config(model).num_key_value_heads
    needle_mass = torch.zeros(len(layers), n_kv, dtype=torch.float64)  # (L, Hkv)
    local_mass = torch.zeros_like(needle_mass)
    span: dict[str, int] = {}

    def measure(idx: int, attn: nn.Module, kwargs: dict, projected: torch.Tensor | None) -> None:
        if not full[idx]:  # sliding-window layers are never compressed
            return
        layer = kwargs.get("cache", kwargs.get("past_key_values")).layers[idx]
        probs = _question_attention(attn, kwargs, projected, layer, len(question))  # (H, Q, T)
        needle, local = _attention_masses(probs, span, sinks, window)  # (H,), (H,)
        needle_mass[idx] += needle.view(n_kv, -1).sum(dim=1)  # (Hkv,)
        local_mass[idx] += local.view(n_kv, -1).sum(dim=1)

    with attention_hooks(layers, on_attention=measure):
        for i, depth in enumerate(
            tqdm(depths, desc="calibrating the head split", unit="text", file=sys.stderr)
        ):
            needle = encode(DUO_NEEDLE.format(value=DUO_VALUES[i % len(DUO_VALUES)]))
            ids, start = passkey_prompt(haystack, needle, question, seq_len, sinks, window, depth)
            span.update(start=start, end=start + len(needle))
            forward(model, [ids], cache=new_cache(model))
    return (needle_mass / (needle_mass + local_mass).clamp_min(1e-12)).float()  # (L, Hkv)
