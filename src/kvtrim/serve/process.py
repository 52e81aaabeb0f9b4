"""A ``kvtrim serve`` process on a free 127.0.0.1 port, started as a user starts it and stopped again.

Tests and ``benchmarks/serve_load.py`` talk to a real server through this: ``start`` returns once
``/health`` answers (or raises with the end of the server's log), ``stop`` sends SIGTERM, ``kill``
stops it at once as a crash would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``kvtrim serve`` process; ``url`` is its base URL once :meth:`start` returned."""

    def __init__(self, model: str, store: Path, *extra: str, threads: int = 1):
        self.model, self.store, self.extra, self.threads = model, Path(store), extra, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = self.store.parent / f"serve-{self.port}.log"

    def start(self, timeout_s: float = 120.0) -> Server:
        self.store.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable,
            "-m",
            "kvtrim.cli",
            "serve",
            "--model",
            self.model,
            "--port",
            str(self.port),
            "--store",
            str(self.store),
            "--log-level",
            "warning",
            *self.extra,
        ]
        with open(self.log, "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvtrim serve exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kvtrim serve did not come up in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        """Stop at once, as a crash would (no shutdown handlers)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
