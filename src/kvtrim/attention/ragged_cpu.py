"""A compiled CPU kernel for ragged layers: every head over its kept pairs and the added tokens in
one call (``kernels/ragged_cpu.cpp``).

The portable path (:mod:`kvtrim.attention.ragged`) makes Hkv + 1 kernel calls per layer and step
and merges their parts; on a CPU each call's fixed cost, not its arithmetic, is what made a ragged
layer decode slower than a dense one (docs/results.md). This kernel reads each head's packed pairs
and the added tokens in place, one (head, query) at a time, and computes the softmax over both at
once: no merge, no copy, no padding; its only memory is one row of scores per thread.

It is built once per machine and torch version with torch's C++ extension tools (a C++ compiler
and ``ninja``) into :func:`kvtrim.core.files.kernel_dir`, for the machine's own instruction set
(``make setup`` builds it; otherwise the first ragged decoding step does). Where it cannot be
built — no compiler, or ``KVTRIM_CPU_KERNELS=0`` — :func:`ragged_kernel` returns None and the
portable path runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kvtrim.core.files import kernel_dir

SOURCE = Path(__file__).parent / "kernels" / "ragged_cpu.cpp"

#: query (H, Q, D), kept keys and values (N, D), offsets (Hkv + 1,) int64, added keys and values
#: (Hkv, A, D), scale -> [output (H, Q, D), log-sum-exp (H, Q)]
RaggedKernel = Callable[..., list[torch.Tensor]]


@functools.lru_cache(maxsize=1)
def ragged_kernel() -> RaggedKernel | None:
    """The compiled kernel, building it on first use (~30 s, once); None where it cannot be built."""
    if os.environ.get("KVTRIM_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"kvtrim: no C++ compiler ({compiler}): ragged layers use the per-head path", file=sys.stderr)
        return None
    source = SOURCE.read_bytes()
    # built for this CPU's instruction set: another CPU (a shared home folder) builds its own
    tag = hashlib.sha256(source + torch.__version__.encode() + _cpu_features()).hexdigest()[:16]
    build = kernel_dir() / f"ragged_cpu-{tag}"
    try:
        from torch.utils.cpp_extension import load

        if not any(build.glob("*.so")):
            message = f"kvtrim: building the CPU ragged-attention kernel once (~30 s) in {build}"
            print(message, file=sys.stderr)
        build.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            module = load(
                name=f"kvtrim_ragged_cpu_{tag}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as error:  # no compiler, no ninja, a failed build: the portable path runs
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        print(
            f"kvtrim: the CPU ragged-attention kernel did not build ({first_line}); ragged layers use "
            "the per-head path",
            file=sys.stderr,
        )
        return None
    return module.ragged_attention


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
