"""Token by token generation after a (compressed) cache, for streaming answers.

Greedy at ``temperature == 0`` (the same tokens as :meth:`kvtrim.Session.ask`), otherwise sampling
with temperature and nucleus (``top_p``) from a generator seeded per request. The cache is restored
to its state before the request when the generator closes, however it ends (finished, stopped by a
stop string, cancelled by a disconnect or a timeout), so every request sees the same context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.generation import cache_length, left_pad, padded_positions
from kvtrim.models.forward import forward


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy when ``temperature`` is 0."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from the last position's ``logits`` (V,)."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (V,)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p  # keep the smallest nucleus
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: nn.Module,
    cache: object,
    start: int,
    prompt_ids: Sequence[int],
    sampling: Sampling,
    stop_ids: set[int],
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[int]:
    """Feed ``prompt_ids`` at positions ``start…`` then yield new tokens until a stop token, the
    token limit or ``cancelled()``; the cache is put back as it was when the generator closes."""
    snapshot = CacheSnapshot.take(cache)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    try:
        ids = list(prompt_ids)
        position = start
        for _ in range(sampling.max_new_tokens):
            if cancelled():
                return
            positions = torch.arange(position, position + len(ids))[None]  # (1, q)
            logits = forward(model, [ids], positions, cache).logits[0, -1]  # (V,)
            token = pick(logits, sampling, generator)
            if token in stop_ids:
                return
            yield token
            position += len(ids)
            ids = [token]
    finally:
        snapshot.restore(cache)


class TextStream:
    """Turns tokens into text pieces, ending at the first stop string (never emitted).

    Text that could still become a stop string, or an incomplete UTF-8 character, is held back
    until the next token decides it."""

    def __init__(self, tokenizer: object, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the new text safe to emit now (``stopped`` is set at a stop string)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        for stop in self.stops:
            found = self.text.find(stop)
            if found >= 0:
                self.text = self.text[:found]
                self.stopped = True
        if self.stopped:
            return self._emit(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._emit(safe)

    def finish(self) -> str:
        """What was held back, at the end of generation."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    cache: object,
    start: int,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[Sampling],
    stop_ids: set[int],
    finished: Callable[[int], bool],
    pad_id: int = 0,
) -> Iterator[tuple[int, int | None]]:
    """:func:`generate` for several prompts after one context, batched (``cache`` holds one row
    per prompt): yields ``(row, token)``, and ``(row, None)`` once when a row ends (stop token,
    its own limit, or ``finished(row)``). Rows that end leave the batch."""
    padding, ids, prompt_mask = left_pad(prompts, pad_id)  # (B, W)
    mask = None
    if any(padding):
        slots = torch.ones(len(prompts), cache_length(cache), dtype=prompt_mask.dtype)
        mask = torch.cat([slots, prompt_mask], dim=1)  # (B, K + W)
    positions = padded_positions(padding, ids.shape[1], [start] * len(prompts))  # (B, W)
    generators = []
    for sampling in samplings:
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        generators.append(generator)
    active, produced = list(range(len(prompts))), [0] * len(prompts)
    while active:
        logits = forward(model, ids, positions, cache, mask).logits[:, -1]  # (B', V)
        going, tokens = [], []
        for slot, row in enumerate(active):
            token = None if finished(row) else pick(logits[slot], samplings[row], generators[row])
            if token is None or token in stop_ids:
                yield row, None
                continue
            yield row, token
            produced[row] += 1
            if produced[row] >= samplings[row].max_new_tokens or finished(row):
                yield row, None
                continue
            going.append(slot)
            tokens.append(token)
        if not going:
            return
        positions = positions[going, -1:] + 1
        if len(going) < len(active):
            keep = torch.tensor(going, device=logits.device)
            cache.batch_select_indices(keep)  # type: ignore[attr-defined]
            mask = None if mask is None else mask[keep.cpu()]
            active = [active[slot] for slot in going]
        ids = torch.tensor([[t] for t in tokens])  # (B', 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
