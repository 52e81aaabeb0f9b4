"""Ask one question under many compressed caches of the same context at once (benchmark speed).

A benchmark sample is answered under every cell (method × ratio × budget), each cache holding
different pairs of the same context, all asked the same question at the same positions. Decoding
them one by one repeats the model's weights traffic for every cell; stacked as the rows of one
batch (:class:`~kvtrim.cache.masked.HeadMaskedLayer`) they cost little more than one. The rows are
built from the real compressed sessions (after their figures are taken) and freed once the answers
are out. Rows that stop (stop token) leave the batch, so short answers do not pay for long ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from kvtrim.attention.interface import enable
from kvtrim.cache.layers import head_pairs, is_sliding
from kvtrim.cache.masked import HeadMaskedLayer
from kvtrim.core.clock import device_time
from kvtrim.generation import decode, stop_token_ids
from kvtrim.models.adapters import model_device
from kvtrim.sessions.answer import Answer
from kvtrim.sessions.session import Session
from kvtrim.strategies.planner import check_cell_batch


def stack_caches(sessions: Sequence[Session], room: int) -> Any:
    """One cache whose row b holds session b's kept pairs (see the module docstring). Sliding-window
    layers, never compressed and so the same in every session, are repeated once per row."""
    cache = copy.copy(sessions[0].cache)
    cache.layers = [
        _repeated(layer, len(sessions))
        if is_sliding(layer)
        else HeadMaskedLayer.stack([head_pairs(s.cache.layers[idx]) for s in sessions], room)
        for idx, layer in enumerate(sessions[0].cache.layers)
    ]
    return cache


def _repeated(layer: Any, rows: int) -> Any:
    """A copy of a one-row transformers layer with ``rows`` identical rows (B, Hkv, W, D)."""
    clone = copy.copy(layer)
    clone.keys = layer.keys.expand(rows, *layer.keys.shape[1:]).contiguous()
    clone.values = layer.values.expand(rows, *layer.values.shape[1:]).contiguous()
    return clone


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
    check_cell_batch(sessions)
    first = sessions[0]
    model, tokenizer = first.model, first.tokenizer
    question, ids = first.prompt_ids(question, max_new_tokens, answer_prefix)
    enable(model)  # the batch's attention lives in kvtrim_sdpa (plain sdpa elsewhere)
    start = device_time(model_device(model))
    cache = stack_caches(sessions, room=len(ids) + max_new_tokens)  # copies: sessions stay as they are
    n = len(sessions)
    stop_ids = stop_token_ids(model, tokenizer)
    generated = decode(model, cache, [ids] * n, [first.first_position] * n, [max_new_tokens] * n, stop_ids)
    share = (device_time(model_device(model)) - start) / n
    return [
        Answer(question, tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, share)
        for tokens in generated
    ]
