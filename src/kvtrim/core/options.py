"""Build a configured scorer or budget from its options, each wrong one becoming one clear error.

Options come from strings (``expected-attention:epsilon=0.01``), so a typo or a word where a number
belongs must be caught when the object is built, not as a traceback deep inside a prefill: every
option is checked against the type its class declares for it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from kvtrim.core.errors import KVTrimError


def build(cls: type, what: str, options: dict[str, Any]) -> Any:
    """``cls(**options)`` after checking each option's name and kind; ``what`` names it in errors
    (``method 'knorm'``)."""
    hints = _hints(cls)
    for name, value in options.items():
        hint = hints.get(name)
        if hint is not None and not _accepts(hint, value):
            raise KVTrimError(f"Bad option for {what}: {name} must be {_kind(hint)}, got {value!r}.")
    try:
        return cls(**options)
    except TypeError as err:
        text = str(err)
        reason = text.split("__init__() ", 1)[-1] if "__init__()" in text else text
        raise KVTrimError(f"Bad option for {what}: {reason}") from err


def _hints(cls: type) -> dict[str, Any]:
    try:
        target = cls if dataclasses.is_dataclass(cls) else cls.__init__
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to no checking
        return {}
    if dataclasses.is_dataclass(cls):
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}
    return {k: v for k, v in hints.items() if k != "return"}


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin) if isinstance(origin, type) else True
    return isinstance(value, hint) if isinstance(hint, type) else True


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_kind(arg) for arg in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a word or a quoted string"}
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "none"
    origin = typing.get_origin(hint) or hint
    return {list: "a JSON list", tuple: "a JSON list", dict: "a JSON object"}.get(
        origin, getattr(origin, "__name__", str(origin))
    )
