"""``CompressionSpec``: one value for every axis of a compression, with one canonical string form.

The API, the CLI, bench rows and configs all speak it, so one compression has one name everywhere
and a serialisable, hashable identity::

    knorm@0.5                                          KNorm, half of the cache evicted
    expected-attention:epsilon=0.01@0.5+adaptive       options ride on names; '+' names the budget
    knorm@0.75+tokens:tokens=512/chunk=256             '/' adds the schedule and the other axes
    knorm@0.5/decode-budget=1024/evict-every=8
    snapkv@0.5/key-channels=0.5
    snapkv-query-aware@0.5/query-aware
    keydiff@0.75/evicted=merge                         evicted values folded into kept ones
    knorm@0.5/rerotate                                 kept keys moved to positions 0..K-1
    lagkv@0.5/windows                                  sliding-window layers compressed too

Grammar: ``SCORER[@RATIO][+BUDGET](/PART)*``. SCORER and BUDGET are ``NAME(:KEY=VALUE)*``; a PART is
``chunk=N``, ``decode-budget=N``, ``evict-every=K``, ``key-channels=R``, ``evicted=drop|merge|cam``,
``rerotate``, ``windows`` or ``query-aware`` (the ``kvtrim ask`` flags of the same names). A value is
``true``/``false``/``none``, a number, a bare word, or JSON (a quoted string, a list, an object)
when it holds any other character.

This module checks what a value alone can tell (ranges, counts). Which scorer works with which
budget or schedule is decided in one place, :mod:`kvtrim.strategies.planner`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import check_channel_ratio, check_ratio

#: the compression used wherever none is named (``compress()``, ``compressing()``, ``kvtrim ask``,
#: ``demo`` and ``serve``), chosen from the RULER sweeps of both named models: the cheapest
#: configuration that held best on both at ratio 0.5 (docs/results.md, "The default compression"):
#: LagKV's scores, each layer and head keeping its share by LU-KV's curves (calibrated once per model)
DEFAULT_SPEC = "lagkv@0.5+lukv"
DEFAULT_METHOD = DEFAULT_SPEC.split("@")[0].split(":")[0]  # a bare CompressionSpec()'s method
DEFAULT_RATIO = 0.5
DEFAULT_EVICT_EVERY = 16
#: what becomes of evicted pairs: dropped, or their values folded into kept ones (kvtrim.cache.merge),
#: or — while decoding — spread over the next kept ones by CaM's rule (kvtrim.cache.cam)
EVICTED = ("drop", "merge", "cam")
Options = tuple[tuple[str, Any], ...]

_BARE = re.compile(r"[A-Za-z0-9_.\-]+")


# --- values -----------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """``true``/``false`` -> bool, ``none`` -> None, then int, float, JSON, or the text itself."""
    text = text.strip()
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
    if text[:1] in ('"', "[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise KVTrimError(f"Bad JSON value {text!r}: {err.msg}.") from err
    return text


def format_value(value: Any) -> str:
    """The inverse of :func:`parse_value`: the shortest text that parses back to ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value).replace("e+", "e")
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, str) and _BARE.fullmatch(value) and parse_value(value) == value:
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def option_key(key: str) -> str:
    """Option names take ``-`` or ``_`` alike: ``n-sink`` is ``n_sink``."""
    return key.strip().replace("-", "_")


def normalise_options(options: Mapping[str, Any] | Options | None) -> Options:
    """Options as sorted ``(key, value)`` pairs: one order, so equal options compare equal."""
    if not options:
        return ()
    pairs = options.items() if isinstance(options, Mapping) else options
    out: dict[str, Any] = {}
    for key, value in pairs:
        name = option_key(str(key))
        if not name:
            raise KVTrimError("An option needs a name: write key=value.")
        out[name] = value
    return tuple(sorted(out.items()))


def parse_named(text: str) -> tuple[str, dict[str, Any]]:
    """``'name:key=value:...'`` -> ``(name, {key: value})`` (values as :func:`parse_value` reads them)."""
    name, *parts = _split(text, ":")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = option_key(key)
        if not sep or not key:
            raise KVTrimError(f"Bad option {part!r} in {text!r}: write name:key=value[:key=value...].")
        if key in options:
            raise KVTrimError(f"Option {key!r} is given twice in {text!r}.")
        options[key] = parse_value(value)
    return name.strip(), options


def format_named(name: str, options: Options | Mapping[str, Any] = ()) -> str:
    """``name:key=value:...`` with the options in canonical order."""
    return "".join([name, *(f":{k}={format_value(v)}" for k, v in normalise_options(options))])


def _split(text: str, delimiter: str) -> list[str]:
    """Split ``text`` at ``delimiter`` where it stands outside JSON strings, lists and objects."""
    pieces: list[str] = []
    start = depth = 0
    quoted = escaped = False
    for i, char in enumerate(text):
        if quoted:  # inside a JSON string only an unescaped quote matters
            quoted = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == delimiter and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    return [*pieces, text[start:]]


# --- the spec ---------------------------------------------------------------------------------


class Cell(NamedTuple):
    """A point of a sweep: the method, ratio and budget labels of one spec (bench rows use them)."""

    method: str
    ratio: float
    budget: str


@dataclass(frozen=True)
class CompressionSpec:
    """Every axis of one compression: a frozen, hashable value with a canonical string form.

    ``method`` names the scorer (``kvtrim methods``), ``ratio`` the fraction of pairs evicted,
    ``budget`` how many each layer and head keeps; the schedule is one-shot after the prefill,
    ``chunk_size`` (compress after every chunk of the prefill) and/or ``decode_budget`` (keep
    evicting while answering, every ``evict_every`` tokens); ``key_channels`` prunes that fraction
    of the key channels too (ThinK); ``query_aware`` compresses the question with the context;
    ``evicted`` says whether evicted pairs are dropped or merged into their kept neighbours;
    ``rerotate`` re-rotates the kept keys to positions 0..K−1, so the cache is an ordinary prefix
    and the question continues at position K; ``windows`` compresses sliding-window layers too,
    each head keeping the share (1 − ratio) of its window by the method's scores.
    """

    method: str = DEFAULT_METHOD
    method_options: Options | Mapping[str, Any] = ()
    ratio: float = DEFAULT_RATIO
    budget: str = "uniform"
    budget_options: Options | Mapping[str, Any] = ()
    chunk_size: int | None = None
    decode_budget: int | None = None
    evict_every: int = DEFAULT_EVICT_EVERY
    key_channels: float = 0.0
    query_aware: bool = False
    evicted: str = "drop"
    rerotate: bool = False
    windows: bool = False
    _text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("method", "budget"):
            if not str(getattr(self, name)).strip():
                raise KVTrimError(f"The spec needs a {name} name.")
        set_ = object.__setattr__
        set_(self, "method_options", normalise_options(self.method_options))
        set_(self, "budget_options", normalise_options(self.budget_options))
        set_(self, "ratio", check_ratio(self.ratio))
        set_(self, "key_channels", check_channel_ratio(self.key_channels))
        set_(self, "query_aware", bool(self.query_aware))
        set_(self, "rerotate", bool(self.rerotate))
        set_(self, "windows", bool(self.windows))
        if self.evicted not in EVICTED:
            raise KVTrimError(f"evicted must be one of {', '.join(EVICTED)}, got {self.evicted!r}.")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise KVTrimError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.decode_budget is None:
            set_(self, "evict_every", DEFAULT_EVICT_EVERY)  # meaningless without a decoding budget
        else:
            _check_decoding(int(self.decode_budget), int(self.evict_every))
        set_(self, "_text", self._format())

    # --- conversions ----------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """The spec a canonical (or hand-written) string describes; see the module docstring."""
        if not isinstance(text, str) or not text.strip():
            raise KVTrimError("An empty spec: write e.g. 'knorm@0.5' or 'snapkv@0.5+adaptive'.")
        head, *parts = _split(text.strip(), "/")
        fields_: dict[str, Any] = {}
        method_text, budget_text = head, None
        pieces = _split(head, "+")
        if len(pieces) > 2:
            raise KVTrimError(f"Spec {text!r} names more than one budget ('+').")
        if len(pieces) == 2:
            method_text, budget_text = pieces
            fields_["budget"], options = parse_named(budget_text)
            fields_["budget_options"] = options
        named = _split(method_text, "@")
        if len(named) > 2:
            raise KVTrimError(f"Spec {text!r} gives more than one ratio ('@').")
        if len(named) == 2:
            fields_["ratio"] = _number(named[1], "ratio", text)
        fields_["method"], fields_["method_options"] = parse_named(named[0])
        for part in parts:
            fields_.update(_part(part, text))
        return cls(**fields_)

    def __str__(self) -> str:
        return self._text

    def _format(self) -> str:
        text = format_named(self.method, self.method_options) + "@" + format_value(self.ratio)
        if self.budget != "uniform" or self.budget_options:
            text += "+" + format_named(self.budget, self.budget_options)
        if self.chunk_size is not None:
            text += f"/chunk={int(self.chunk_size)}"
        if self.decode_budget is not None:
            text += f"/decode-budget={int(self.decode_budget)}"
            if self.evict_every != DEFAULT_EVICT_EVERY:
                text += f"/evict-every={int(self.evict_every)}"
        if self.key_channels:
            text += f"/key-channels={format_value(self.key_channels)}"
        if self.evicted != "drop":
            text += f"/evicted={self.evicted}"
        if self.rerotate:
            text += "/rerotate"
        if self.windows:
            text += "/windows"
        return text + ("/query-aware" if self.query_aware else "")

    def __hash__(self) -> int:
        return hash(self._text)

    def digest(self) -> str:
        """A stable identity (SHA-256 of the canonical string, 16 hex digits), the same in every process."""
        return hashlib.sha256(self._text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["method_options"] = dict(self.method_options)
        out["budget_options"] = dict(self.budget_options)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionSpec:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KVTrimError(
                f"Unknown spec field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        return cls(**data)

    @classmethod
    def of(
        cls,
        method: str = DEFAULT_METHOD,
        ratio: float = DEFAULT_RATIO,
        budget: str = "uniform",
        budget_options: Mapping[str, Any] | None = None,
        **axes: Any,
    ) -> CompressionSpec:
        """A spec from labels that may carry options (``expected-attention:epsilon=0.01``,
        ``adaptive:alpha=0.1``); ``budget_options`` and ``method_options`` in ``axes`` come on top."""
        name, options = parse_named(method)
        budget_name, from_label = parse_named(budget)
        extra = dict(axes.pop("method_options", None) or {})
        return cls(
            method=name,
            method_options={**options, **extra},
            ratio=ratio,
            budget=budget_name,
            budget_options={**from_label, **(budget_options or {})},
            **axes,
        )

    @classmethod
    def default(cls, ratio: float | None = None) -> CompressionSpec:
        """:data:`DEFAULT_SPEC`, at ``ratio`` when given."""
        spec = cls.parse(DEFAULT_SPEC)
        return spec if ratio is None else spec.with_(ratio=ratio)

    # --- labels ---------------------------------------------------------------------------------

    @property
    def method_label(self) -> str:
        """The method with its options, as rows and reports name it: ``expected-attention:epsilon=0.01``."""
        return format_named(self.method, self.method_options)

    @property
    def budget_label(self) -> str:
        return format_named(self.budget, self.budget_options)

    @property
    def cell(self) -> Cell:
        return Cell(self.method_label, self.ratio, self.budget_label)

    @classmethod
    def from_cell(cls, cell: Cell | tuple[str, float, str], **axes: Any) -> CompressionSpec:
        method, ratio, budget = cell
        return cls.of(method, ratio, budget, **axes)

    def with_(self, **changes: Any) -> CompressionSpec:
        """A copy with some axes changed (validated like a new spec)."""
        return replace(self, **changes)


def _check_decoding(tokens: int, every: int) -> None:
    if tokens < 1:
        raise KVTrimError(f"The decoding budget must be >= 1 pair per head, got {tokens}.")
    if not 1 <= every <= tokens:
        raise KVTrimError(f"evict_every must be between 1 and the decoding budget ({tokens}), got {every}.")


_PARTS = {
    "chunk": ("chunk_size", int),
    "decode-budget": ("decode_budget", int),
    "evict-every": ("evict_every", int),
    "key-channels": ("key_channels", float),
}
_WORD_PARTS = {"evicted": ("evicted", EVICTED)}


def _part(part: str, text: str) -> dict[str, Any]:
    """One ``/``-separated part of a spec string."""
    key, sep, value = part.partition("=")
    key = key.strip().replace("_", "-")
    if key == "query-aware" and not sep:
        return {"query_aware": True}
    if key == "rerotate" and not sep:
        return {"rerotate": True}
    if key == "windows" and not sep:
        return {"windows": True}
    if key in _WORD_PARTS and sep:
        name, choices = _WORD_PARTS[key]
        if value.strip() not in choices:
            raise KVTrimError(
                f"The {key} part of spec {text!r} must be one of {', '.join(choices)}, got {value!r}."
            )
        return {name: value.strip()}
    if key not in _PARTS or not sep:
        known = ", ".join(
            [*(f"{k}=..." for k in _PARTS), "evicted=drop|merge|cam", "rerotate", "windows", "query-aware"]
        )
        raise KVTrimError(f"Unknown part {part!r} in spec {text!r}; parts are {known}.")
    name, kind = _PARTS[key]
    return {name: kind(_number(value, key, text))}


def _number(value: str, what: str, text: str) -> float:
    parsed = parse_value(value)
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
        raise KVTrimError(f"The {what} in spec {text!r} must be a number, got {value!r}.")
    return parsed
