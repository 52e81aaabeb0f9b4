"""A compressed context, answering any number of questions from its cache.

Each question is appended after the compressed context with its *true* RoPE positions (the
context's length, not the shorter cache's; after key re-rotation the cache is an ordinary prefix of
its K kept pairs and the question starts at K), answered by greedy decoding, and the cache is then
restored to its compressed state, so every question sees exactly the same cache.

A query-aware session (``compress(..., question=q)``) holds its question already, compressed with
the context: only the end of the prompt (the chat template's closing, the answer prefix) follows.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.compressor import Compressor
from kvtrim.generation import greedy_decode, stop_token_ids
from kvtrim.models.adapters import max_context
from kvtrim.models.prompting import PromptLayout, encode
from kvtrim.sessions.answer import Answer
from kvtrim.sessions.stored import save_session


@dataclass
class Session:
    """A compressed context, ready for questions (build it with :func:`kvtrim.compress`)."""

    model: nn.Module
    tokenizer: Any
    cache: Any
    layout: PromptLayout
    context_length: int
    method: str
    ratio: float
    stats: CompressionStats
    prefill_s: float
    answers: list[Answer] = field(default_factory=list)
    #: evicting while decoding: the compressor attached during every answer (its state is reset after it)
    compressor: Compressor | None = None
    #: the budget label (``uniform``, ``pyramid``, ``adaptive:alpha=0.1``, ...)
    budget: str = "uniform"
    #: the question compressed together with the context (query-aware), or None
    question: str | None = None
    #: every axis of the compression that made this session
    spec: CompressionSpec | None = None
    #: the RoPE position of the next token when it is not ``context_length``: the kept count K
    #: after key re-rotation (``/rerotate``), the cache then being an ordinary K-token prefix
    next_position: int | None = None

    @property
    def first_position(self) -> int:
        """Where the question starts: the context's true length, or K after key re-rotation."""
        return self.context_length if self.next_position is None else self.next_position

    @property
    def evicts_while_decoding(self) -> bool:
        return self.compressor is not None

    def save(self, path: str | Path) -> Path:
        """Write this session to the folder ``path``, atomically and with checksums; load it back
        with :func:`kvtrim.load_session` (same model and tokenizer)."""
        return save_session(self, path)

    def ask(self, question: str | None = None, max_new_tokens: int = 64, answer_prefix: str = "") -> str:
        """Answer ``question`` from the compressed cache (greedy decoding).

        ``answer_prefix`` is put after the prompt's end (after the assistant tag with a chat
        template) and the model continues it, as benchmarks like RULER do; it is not part of the
        returned text. A query-aware session already holds its question: pass it again or None.
        """
        return self.answer(question, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix).text

    def prompt_ids(
        self, question: str | None, max_new_tokens: int, answer_prefix: str = ""
    ) -> tuple[str, list[int]]:
        """The question answered and the tokens fed after the compressed cache before decoding.

        A query-aware session holds its question already: only the template's closing and the
        answer prefix follow. Refuses an empty question and a prompt beyond the model's window.
        """
        if max_new_tokens < 1:
            raise KVTrimError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.question is not None:
            question, ids = self.question, self._closing_ids(question, answer_prefix)
        else:
            if question is None or not question.strip():
                raise KVTrimError("The question is empty.")
            ids = encode(self.tokenizer, self.layout.question_text(question) + answer_prefix)
        limit = max_context(self.model)
        if self.first_position + len(ids) + max_new_tokens > limit:
            raise KVTrimError(
                f"Context ({self.first_position}) + question ({len(ids)}) + max_new_tokens "
                f"({max_new_tokens}) tokens exceed the model's window of {limit} tokens."
            )
        return question, ids

    def _closing_ids(self, question: str | None, answer_prefix: str) -> list[int]:
        """A query-aware session's question is in the cache already: only the prompt's closing follows."""
        if question is not None and question != self.question:
            raise KVTrimError(
                "This session compressed its question with the context (query-aware) and can "
                "answer only that one; compress again with question=... to ask another."
            )
        ids = encode(self.tokenizer, self.layout.question_suffix + answer_prefix)
        if not ids:
            raise KVTrimError(
                "Nothing follows the compressed question in this prompt layout; give an "
                "answer_prefix for the model to continue."
            )
        return ids

    @torch.inference_mode()
    def answer(
        self, question: str | None = None, max_new_tokens: int = 64, answer_prefix: str = ""
    ) -> Answer:
        """Like :meth:`ask`, returning token ids and timing as well."""
        question, ids = self.prompt_ids(question, max_new_tokens, answer_prefix)
        start = time.perf_counter()
        snapshot = CacheSnapshot.take(self.cache)
        evictor = self.compressor
        state = None if evictor is None else evictor.schedule.snapshot()
        try:
            with evictor.attached() if evictor is not None else nullcontext():
                generated = greedy_decode(
                    self.model,
                    self.cache,
                    ids,
                    self.first_position,
                    max_new_tokens,
                    stop_ids=stop_token_ids(self.model, self.tokenizer),
                )
        finally:
            snapshot.restore(self.cache)
            if evictor is not None:
                evictor.schedule.restore(state)
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        result = Answer(question, text, generated, time.perf_counter() - start)
        self.answers.append(result)
        return result
