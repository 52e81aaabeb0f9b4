"""RULER's two metrics, on one prediction at a time (RULER averages them over samples).

Both are case-insensitive substring tests, so a verbose but correct answer still scores: RULER
measures retrieval, not answer formatting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's clean-up before scoring: control characters become newlines, ends are stripped."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: Sequence[str]) -> list[bool]:
    if not references:
        raise ValueError("a sample needs at least one reference string to be scored")
    text = prediction.lower()
    return [ref.lower() in text for ref in references]


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Percentage of the references found in the prediction (partial credit: 3 of 4 → 75)."""
    found = _found(prediction, references)
    return 100.0 * sum(found) / len(found)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """100 if any reference is found, else 0 (QA: references are alternative gold answers)."""
    return 100.0 if any(_found(prediction, references)) else 0.0


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
