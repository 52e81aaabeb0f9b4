"""Method and budget specs: a name with options in one string, ``name:key=value:key=value``.

One string names a configured method or budget everywhere a name is accepted (``--method``,
``--methods``, ``--budgets``, the Python API) and labels the bench's rows, so that two settings of
one method are two methods of a sweep: ``expected-attention:epsilon=0.01``, ``adaptive:alpha=0.1``,
``critical:base=knorm``.
"""

from __future__ import annotations

from typing import Any

from kvtrim.errors import KVTrimError


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``'name:key=value:...'`` -> ``(name, {key: value})``; values become int, float, bool, None
    (``none``) or stay strings."""
    name, *parts = spec.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, text = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise KVTrimError(f"Bad option {part!r} in {spec!r}: write name:key=value[:key=value...].")
        if key in options:
            raise KVTrimError(f"Option {key!r} is given twice in {spec!r}.")
        options[key] = _value(text.strip())
    return name.strip(), options


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
