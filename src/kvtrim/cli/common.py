"""What every subcommand shares: argument types, the compression flags (one
:class:`~kvtrim.CompressionSpec` from them), reading files, and the exit code of user errors.

Torch-free: parsing arguments and printing help never load the library behind them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import read_text
from kvtrim.core.ratios import check_channel_ratio, check_ratio
from kvtrim.core.spec import DEFAULT_SPEC, EVICTED, CompressionSpec, parse_named

EXIT_USAGE = 2
MODEL_HELP = "smollm2-135m (default), gemma3-270m, a hub id, a local directory or a .gguf"


class Parser(argparse.ArgumentParser):
    """argparse with kvtrim's exit code for usage errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"kvtrim: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _checked(check: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return check(text)
        except KVTrimError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


ratio = _checked(check_ratio)
channel_ratio = _checked(check_channel_ratio)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [p.strip() for p in text.split(",") if p.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [kind(p) for p in items]

    return parse


def depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a depth in [0, 1], got {text!r}") from err
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a depth in [0, 1], got {text!r}")
    return value


#: the registered budgets, named here so that ``--help`` loads no torch (a test keeps them in step)
BUDGET_NAMES = (
    "uniform",
    "tokens",
    "pyramid",
    "layers",
    "adaptive",
    "threshold",
    "duo",
    "simlayer",
    "lukv",
    "kvcompose",
)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default=None,
        help=f"compression method, options as name:key=value (default: {DEFAULT_SPEC}'s; "
        "see `kvtrim methods`)",
    )
    parser.add_argument(
        "--ratio", type=ratio, default=None, help="fraction of the KV cache evicted, in [0, 1) (default 0.5)"
    )
    parser.add_argument("--model", default=None, help=MODEL_HELP)


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every axis of a compression, and ``--spec`` for all of them at once."""
    parser.add_argument(
        "--spec",
        default=None,
        help="the whole compression as one spec, e.g. knorm@0.75+tokens:tokens=512/chunk=256 (instead "
        "of the method, ratio, budget, chunk, decoding and key-channel flags)",
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="how many pairs each layer and head keeps: " + ", ".join(BUDGET_NAMES) + "; "
        "options as name:key=value (default uniform, or the default compression's with no --method; "
        "see `kvtrim methods`)",
    )
    parser.add_argument(
        "--budget-tokens",
        type=positive,
        default=None,
        help="keep at most N pairs per layer and head (implies --budget tokens)",
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="keep pairs scoring >= TAU (implies --budget threshold)"
    )
    parser.add_argument(
        "--chunk",
        type=positive,
        default=None,
        help="prefill N tokens at a time, compressing after each chunk (bounded memory)",
    )
    parser.add_argument(
        "--decode-budget",
        type=positive,
        default=None,
        help="while answering, keep at most N pairs per layer and head, evicting with the same method",
    )
    parser.add_argument(
        "--evict-every",
        type=positive,
        default=None,
        help="with --decode-budget: evict every K generated tokens (default 16)",
    )
    parser.add_argument(
        "--key-channels",
        type=channel_ratio,
        default=None,
        metavar="R",
        help="also prune this fraction of every layer's key channels (ThinK), e.g. 0.5",
    )
    parser.add_argument(
        "--evicted",
        choices=EVICTED,
        default=None,
        help="what becomes of evicted pairs: drop them (default), merge their values into the most "
        "similar kept pair, or cam: while decoding, spread them over the next kept pairs (CaM; "
        "needs --decode-budget)",
    )
    parser.add_argument(
        "--rerotate",
        action="store_const",
        const=True,
        default=None,
        help="re-rotate the kept keys to positions 0..K-1: the cache becomes an ordinary prefix and the "
        "question continues at position K",
    )
    parser.add_argument(
        "--windows",
        action="store_const",
        const=True,
        default=None,
        help="compress sliding-window layers too (Gemma 3): each head keeps the share 1 - ratio of its "
        "window by the method's scores, so the whole cache shrinks",
    )


_AXIS_FLAGS = {
    "method": "--method",
    "ratio": "--ratio",
    "budget": "--budget",
    "budget_tokens": "--budget-tokens",
    "threshold": "--threshold",
    "chunk": "--chunk",
    "decode_budget": "--decode-budget",
    "evict_every": "--evict-every",
    "key_channels": "--key-channels",
    "evicted": "--evicted",
    "rerotate": "--rerotate",
    "windows": "--windows",
}


def spec_from_args(args: argparse.Namespace) -> CompressionSpec:
    """The compression the flags describe (``--spec``, or the method, ratio and axis flags)."""
    given = [flag for name, flag in _AXIS_FLAGS.items() if getattr(args, name) is not None]
    if args.spec is not None:
        if given:
            raise KVTrimError(f"--spec gives every axis already; drop {', '.join(given)}.")
        return CompressionSpec.parse(args.spec)
    budget, options = _budget(args)
    axes = {
        "chunk_size": args.chunk,
        "decode_budget": args.decode_budget,
        "evict_every": args.evict_every or 16,
        "key_channels": args.key_channels or 0.0,
        "evicted": args.evicted or "drop",
        "rerotate": bool(args.rerotate),
        "windows": bool(args.windows),
    }
    if args.method is None:  # the default compression, with the axes the flags give
        default = CompressionSpec.default(args.ratio)
        if args.budget is None and not options:
            budget, options = default.budget, dict(default.budget_options)
        return CompressionSpec.of(
            default.method,
            default.ratio,
            budget,
            options,
            method_options=dict(default.method_options),
            **axes,
        )
    return CompressionSpec.of(args.method, 0.5 if args.ratio is None else args.ratio, budget, options, **axes)


def _budget(args: argparse.Namespace) -> tuple[str, dict]:
    """The budget the budget flags ask for: ``--budget``, or ``--budget-tokens`` / ``--threshold``."""
    budget = args.budget
    name = parse_named(budget)[0] if budget else None
    for flag, kind, value in (
        ("--budget-tokens", "tokens", args.budget_tokens),
        ("--threshold", "threshold", args.threshold),
    ):
        if value is None:
            continue
        if name not in (None, kind):
            raise KVTrimError(f"{flag} goes with --budget {kind} (or no --budget).")
        return budget or kind, {kind: value}
    if name in ("tokens", "threshold") and not parse_named(budget)[1]:
        raise KVTrimError(f"--budget {name} needs --{'budget-tokens' if name == 'tokens' else 'threshold'}.")
    return budget or "uniform", {}


def read_context(path: str) -> str:
    """A context file's text ('-' reads stdin); a missing or non-UTF-8 file is a user error."""
    if path == "-":
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as err:
            raise KVTrimError("The standard input is not UTF-8 text; convert it to UTF-8 first.") from err
    return read_text(path, "Context file")


def existing_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise KVTrimError(f"{what} not found: {path}")
    return str(file.resolve())


def model_label(model: str | None) -> str:
    """How a run names its model: the embedded default, a resolved path, or a hub id."""
    if model is None or model == "smollm2-135m":
        return "embedded:SmolLM2-135M-Instruct"
    if model == "gemma3-270m":
        return "named:gemma3-270m"
    return str(Path(model).resolve()) if Path(model).exists() else model
