"""Run the ``kvtrim`` command in this process or in a process of its own, with a subprocess's result.

In this process, ``kvtrim.cli.main`` runs with stdin, stdout and stderr redirected: that is all
``python -m kvtrim.cli`` runs besides passing main's return value to ``sys.exit``, without the
interpreter start and the library's import each call costs. An exception main lets through is
raised into the test, so a traceback still fails it. ``run_process`` starts the real command, as a
user does, for what only a process shows (imports, files read back by another process).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from kvtrim.cli import main


def exit_code(*args: str) -> int:
    """The command's exit code, run in this process; its output goes wherever stdout/stderr point."""
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's own usage errors and --help
        return int(exit_.code or 0)


def run_here(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The command's exit code, stdout and stderr (text), run in this process."""
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = exit_code(*args)
    finally:
        sys.stdin = saved_stdin
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The command in a process of its own (text output), ``env`` added to this one's environment."""
    return subprocess.run(
        [sys.executable, "-m", "kvtrim.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
