"""The ``kvtrim`` command line: one module per subcommand, each with its arguments (``add_parser``)
and its work (``run``).

Errors a user can cause print one line on stderr and exit with code 2, without a traceback. A
subcommand's ``run`` imports the library (torch, transformers) when it starts, so ``kvtrim --help``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvtrim.cli import ask, bench, calibrate, demo, methods, report, serve
from kvtrim.cli.common import EXIT_USAGE, Parser
from kvtrim.core.errors import KVTrimError
from kvtrim.core.version import __version__

COMMANDS = {
    "ask": ask,
    "methods": methods,
    "demo": demo,
    "calibrate": calibrate,
    "bench": bench,
    "report": report,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvtrim", description="Compress the KV cache of a causal LM and answer from it.")
    parser.add_argument("--version", action="version", version=f"kvtrim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except KVTrimError as err:
        print(f"kvtrim: error: {err}", file=sys.stderr)
        return EXIT_USAGE
