"""Running tokens through the model: one prefill and one greedy decoding loop for every caller.

A single context, a left-padded batch of contexts and a batch of cells of one context (which all
share one question) all prefill with :func:`prefill` and answer with :func:`decode`: the prompt
after the cached context, then one token per step, every row at its own true RoPE positions
(the context's length, not the shorter cache's). Rows that stop leave the batch, so short answers
do not pay for long ones. The phases follow gpt-fast's ``generate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kvtrim.core.clock import device_time
from kvtrim.models.adapters import model_device
from kvtrim.models.forward import forward


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(x) for x in source)
    return ids


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Left-pad token rows: (padding per row, ids (B, W), mask (B, W) with 1 on real tokens)."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    ids = torch.tensor([[pad_id] * p + list(r) for p, r in zip(padding, rows, strict=True)])  # (B, W)
    mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(padding, rows, strict=True)])  # (B, W)
    return padding, ids, mask


def padded_positions(padding: Sequence[int], width: int, starts: Sequence[int]) -> torch.Tensor:
    """(B, W) RoPE positions: row b counts from starts[b] at its first real token; pads repeat it."""
    steps = torch.arange(width)[None] - torch.tensor(padding)[:, None]  # (B, W)
    return steps.clamp(min=0) + torch.tensor(starts)[:, None]


def prefill(
    model: nn.Module,
    cache: Any,
    rows: Sequence[Sequence[int]],
    *,
    chunk_size: int | None = None,
    pad_id: int = 0,
) -> tuple[list[int], float]:
    """Fill ``cache`` with token ``rows`` from position 0 (left-padded and masked when there are
    several), ``chunk_size`` tokens per forward when given (one row only). Whatever compressor is
    attached compresses as the forwards run. Returns each row's left padding and the wall time."""
    device = model_device(model)
    start = device_time(device)
    if len(rows) == 1:
        ids = list(rows[0])
        step = chunk_size or len(ids)
        for begin in range(0, len(ids), step):
            end = min(begin + step, len(ids))
            forward(model, [ids[begin:end]], torch.arange(begin, end)[None], cache)  # (1, chunk)
        return [0], device_time(device) - start
    padding, ids, mask = left_pad(rows, pad_id)  # (B, W)
    forward(model, ids, padded_positions(padding, ids.shape[1], [0] * len(rows)), cache, mask)
    return padding, device_time(device) - start


def greedy_decode(
    model: nn.Module,
    cache: Any,
    prompt_ids: list[int],
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[int]:
    """Feed ``prompt_ids`` at positions ``start_position…`` and decode greedily; returns new ids."""
    return decode(model, cache, [prompt_ids], [start_position], [max_new_tokens], stop_ids)[0]


def decode(
    model: nn.Module,
    cache: Any,
    prompts: Sequence[Sequence[int]],
    starts: Sequence[int],
    max_new_tokens: Sequence[int],
    stop_ids: set[int],
    *,
    cache_padding: Sequence[int] | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Feed each row's prompt after its cached context and decode greedily, all rows at once.

    Row b's prompt goes at positions ``starts[b]…``. With padding (``cache_padding`` slots at the
    left of each row's cache, or prompts of different lengths), a 2-D attention mask over
    [cache slots | prompt | decoded tokens] hides the padding. A row leaves the batch once it met a
    stop token or produced its own ``max_new_tokens`` (``cache.batch_select_indices``).
    """
    padding, ids, prompt_mask = left_pad(prompts, pad_id)  # (B, W)
    mask = None
    if any(padding) or any(cache_padding or ()):
        cache_len = cache_length(cache)
        cache_mask = (
            torch.arange(cache_len)[None] >= torch.tensor(cache_padding or [0] * len(prompts))[:, None]
        )
        mask = torch.cat([cache_mask.long(), prompt_mask], dim=1).to(model_device(model))  # (B, K + W)
    positions = padded_positions(padding, ids.shape[1], starts)  # (B, W)
    active = list(range(len(prompts)))  # batch slot -> row
    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(max(max_new_tokens)):
        logits = forward(model, ids, positions, cache, mask).logits
        tokens = logits[:, -1].argmax(dim=-1).tolist()  # (B,)
        going = []
        for slot, token in enumerate(tokens):
            row = active[slot]
            if token not in stop_ids:
                generated[row].append(token)
                if len(generated[row]) < max_new_tokens[row]:
                    going.append(slot)
        if not going:
            break
        positions = positions[:, -1:] + 1
        if len(going) < len(active):
            keep = torch.tensor(going, device=model_device(model))
            cache.batch_select_indices(keep)
            positions = positions[going]
            mask = None if mask is None else mask[keep]
            active = [active[slot] for slot in going]
        ids = torch.tensor([[tokens[slot]] for slot in going])  # (B', 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
    return generated


def cache_length(cache: Any) -> int:
    """The slots every layer of a batched cache holds (they must agree)."""
    lengths = {int(layer.keys.shape[-2]) for layer in cache.layers}
    if len(lengths) != 1:
        raise ValueError("A batched cache needs every layer to hold as many slots.")
    return lengths.pop()
