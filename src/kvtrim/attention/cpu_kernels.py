"""kvtrim's compiled CPU kernels (``kernels/*.cpp``), where one fused loop beats a chain of torch
calls: on a CPU each call's fixed cost, not its arithmetic, is what made these paths slow
(docs/results.md).

- ``ragged_attention``: a ragged layer's decoding step, every head over its kept pairs and the
  added tokens in one call (:mod:`kvtrim.attention.ragged`); no merge, no copy, no padding.

They are built once per machine and torch version with torch's C++ extension tools (a C++
compiler and ``ninja``) into :func:`kvtrim.core.files.kernel_dir`, for the machine's own
instruction set (``make setup`` builds them; otherwise the first call that needs them does).
Where they cannot be built — no compiler, or ``KVTRIM_CPU_KERNELS=0`` — :func:`cpu_kernels`
returns None and the portable torch paths run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from kvtrim.core.files import kernel_dir

KERNELS = Path(__file__).parent / "kernels"
SOURCES = ("bindings.cpp", "ragged_cpu.cpp")
HEADERS = ("fast_exp.h",)


@functools.lru_cache(maxsize=1)
def cpu_kernels() -> ModuleType | None:
    """The compiled kernels' module, built on first use (~1 min, once); None where it cannot be."""
    if os.environ.get("KVTRIM_CPU_KERNELS", "1") == "0":
        return None
    if not has_compiler():
        compiler = os.environ.get("CXX", "c++")
        print(f"kvtrim: no C++ compiler ({compiler}): the portable paths run instead", file=sys.stderr)
        return None
    source = b"".join((KERNELS / name).read_bytes() for name in SOURCES + HEADERS)
    # built for this CPU's instruction set: another CPU (a shared home folder) builds its own
    tag = hashlib.sha256(source + torch.__version__.encode() + _cpu_features()).hexdigest()[:16]
    build = kernel_dir() / f"cpu-{tag}"
    try:
        from torch.utils.cpp_extension import load

        if not any(build.glob("*.so")):
            message = f"kvtrim: building the CPU kernels once (~1 min) in {build}"
            print(message, file=sys.stderr)
        build.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            module = load(
                name=f"kvtrim_cpu_{tag}",
                sources=[str(KERNELS / name) for name in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as error:  # no compiler, no ninja, a failed build: the portable path runs
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        print(
            f"kvtrim: the CPU kernels did not build ({first_line}); the portable paths run instead",
            file=sys.stderr,
        )
        return None
    return module


def has_compiler() -> bool:
    """Whether the C++ compiler torch's extension tools call (``CXX``, else ``c++``) is here."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch finds ``ninja`` on PATH; the one pip installed with kvtrim sits in the environment's
    bin folder, which is not on PATH when the environment is not activated (``.venv/bin/python``)."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja

        folder = ninja.BIN_DIR
    except (ImportError, AttributeError):
        folder = str(Path(sys.executable).parent)
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([folder, before]) if before else folder
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _cpu_features() -> bytes:
    """What identifies this CPU's instruction set: its flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
