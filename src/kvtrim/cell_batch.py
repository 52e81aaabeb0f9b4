"""Ask one question under many compressed caches of the same context at once (benchmark speed).

A benchmark sample is answered under every cell (method × ratio × budget), each cache holding
different pairs of the same context, all asked the same question at the same positions. Decoding
them one by one repeats the model's weights traffic for every cell; stacked as the rows of one
batch they cost little more than one.

Each row of a layer holds that cell's kept pairs per KV head, left-padded to the longest head of
the layer across rows, and a visibility mask (row, head, slot) hides the padding: every head of
every row attends to exactly its own kept pairs plus the new tokens, as its own session does. The
rows are built from the real compressed sessions (after their figures are taken) and freed once
the answers are out; the padding is an evaluation cost, not what a served cache holds.

Rows that stop (stop token) leave the batch, so short answers do not pay for long ones.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from kvtrim import ragged
from kvtrim.errors import KVTrimError
from kvtrim.masked import MaskedKV
from kvtrim.session import Answer, Session, stop_token_ids


class HeadMaskedLayer(CacheLayerMixin):
    """One layer of a cell batch: preallocated (B, Hkv, capacity, D) buffers filled up to ``length``.

    New tokens are written in place (no concatenation of the whole cache at every step) and are
    visible to every head.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.visible = keys, values, visible
        self.length = length
        self.device = keys.device
        self.is_initialized = True

    @classmethod
    def stack(cls, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], room: int) -> HeadMaskedLayer:
        """rows: B × Hkv × (keys (K_bh, D), values (K_bh, Dv)) -> one left-padded layer with room
        for ``room`` more tokens."""
        first_k, first_v = rows[0][0]
        n_heads = len(rows[0])
        width = max(k.shape[0] for row in rows for k, _ in row)
        size = (len(rows), n_heads, width + room)
        keys = first_k.new_zeros(*size, first_k.shape[-1])  # (B, Hkv, L + room, D)
        values = first_v.new_zeros(*size, first_v.shape[-1])
        visible = torch.zeros(size, dtype=torch.bool, device=first_k.device)  # (B, Hkv, L + room)
        for b, row in enumerate(rows):
            for h, (k, v) in enumerate(row):
                keys[b, h, width - k.shape[0] : width] = k
                values[b, h, width - k.shape[0] : width] = v
                visible[b, h, width - k.shape[0] : width] = True
        return cls(keys, values, visible, width)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Write new (B, Hkv, q, D) states after the filled slots; returns a :class:`MaskedKV`."""
        end = self.length + key_states.shape[2]
        if end > self.keys.shape[2]:  # out of room: grow (rare; the room is sized for the answer)
            extra = end - self.keys.shape[2]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, extra))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))
            self.visible = torch.nn.functional.pad(self.visible, (0, extra))
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.visible[:, :, self.length : end] = True
        self.length = end
        masked = MaskedKV(self.keys[:, :, :end], self.values[:, :, :end], self.visible[:, :, :end])
        return masked, masked  # the attention function reads .keys of the first, .values of the second

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (B',) — the rows still decoding."""
        self.keys, self.values, self.visible = self.keys[rows], self.values[rows], self.visible[rows]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a cell batch cannot be reset; build a new one")


def _head_pairs(layer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A single-context layer's kept pairs per KV head: Hkv × (keys (K_h, D), values (K_h, Dv))."""
    if getattr(layer, "key_channels", None) is not None:
        raise KVTrimError("A cell batch cannot hold keys with pruned channels (ThinK).")
    if getattr(layer, "is_sliding", False):
        raise KVTrimError("A cell batch cannot hold sliding-window layers.")
    if hasattr(layer, "head_keys"):  # ragged: (1, K_h, D) per head
        return [(k[0], v[0]) for k, v in zip(layer.head_keys, layer.head_values, strict=True)]
    keys, values = layer.keys, layer.values  # (1, Hkv, K, D)
    if keys.shape[0] != 1:
        raise KVTrimError("A cell batch stacks single-context sessions (batch size 1).")
    return [(keys[0, h], values[0, h]) for h in range(keys.shape[1])]


def check_stackable(sessions: Sequence[Session]) -> None:
    """Refuse sessions that cannot share one question's batch (clear reasons, before any work)."""
    if not sessions:
        raise KVTrimError("No session to answer.")
    first = sessions[0]
    for session in sessions:
        if session.model is not first.model or session.context_length != first.context_length:
            raise KVTrimError("A cell batch needs sessions of the same model and context.")
        if session.layout != first.layout:
            raise KVTrimError("A cell batch needs sessions laid out alike (same prompt template).")
        if session.question != first.question:
            raise KVTrimError("Query-aware sessions of one batch must hold the same question.")
        if session.compressor is not None and session.compressor.decoding is not None:
            raise KVTrimError("A session evicting while decoding cannot be batched.")
        if len(session.cache.layers) != len(first.cache.layers):
            raise KVTrimError("A cell batch needs sessions with as many cache layers.")


def stack_caches(sessions: Sequence[Session], room: int) -> Any:
    """One cache whose row b holds session b's kept pairs (see the module docstring)."""
    cache = copy.copy(sessions[0].cache)
    cache.layers = [
        HeadMaskedLayer.stack([_head_pairs(s.cache.layers[idx]) for s in sessions], room)
        for idx in range(len(sessions[0].cache.layers))
    ]
    return cache


@torch.inference_mode()
def answer_cells(
    sessions: Sequence[Session], question: str | None, max_new_tokens: int = 64, answer_prefix: str = ""
) -> list[Answer]:
    """Answer ``question`` under each session's cache, all in one batch (greedy decoding).

    Row b's answer is the one ``sessions[b].answer(question, ...)`` gives, up to float rounding
    (the batched kernels sum in another order). Query-aware sessions (compressed with the same
    question) are batched too: only the prompt's closing and the prefix follow their caches.
    Each answer's ``answer_s`` is its share of the batch's wall time. The sessions themselves are
    left untouched.
    """
    check_stackable(sessions)
    first = sessions[0]
    model, tokenizer = first.model, first.tokenizer
    question, ids = first.prompt_ids(question, max_new_tokens, answer_prefix)
    ragged.enable(model)  # the batch's attention lives in kvtrim_sdpa (plain sdpa elsewhere)
    start = time.perf_counter()
    cache = stack_caches(sessions, room=len(ids) + max_new_tokens)  # copies: sessions stay as they are
    stop_ids = stop_token_ids(model, tokenizer)
    generated = _decode_rows(model, cache, ids, first.context_length, max_new_tokens, stop_ids, len(sessions))
    share = (time.perf_counter() - start) / len(sessions)
    return [
        Answer(question, tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, share)
        for tokens in generated
    ]


def _decode_rows(
    model: nn.Module,
    cache: Any,
    prompt_ids: list[int],
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    n_rows: int,
) -> list[list[int]]:
    """:func:`kvtrim.session.greedy_decode` for ``n_rows`` rows fed the same prompt; a row that
    meets a stop token leaves the batch."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids] * n_rows, device=device)  # (B, q)
    active = list(range(n_rows))  # batch slot -> row
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    position = start_position
    for _ in range(max_new_tokens):
        positions = torch.arange(position, position + ids.shape[1], device=device)[None]
        logits = model(
            input_ids=ids,
            position_ids=positions.expand(len(active), -1),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        position += ids.shape[1]
        tokens = logits[:, -1].argmax(dim=-1).tolist()  # (B,)
        going = [slot for slot, token in enumerate(tokens) if token not in stop_ids]
        for slot in going:
            generated[active[slot]].append(tokens[slot])
        if not going:
            break
        if len(going) < len(active):
            keep = torch.tensor(going, device=device)
            for layer in cache.layers:
                layer.keep_rows(keep)
            active = [active[slot] for slot in going]
        ids = torch.tensor([[tokens[slot]] for slot in going], device=device)  # (B', 1)
    return generated
