"""One answer, with the time it took to produce."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Answer:
    """One answer, with the time it took to produce."""

    question: str
    text: str
    token_ids: list[int]
    answer_s: float
