"""Wall-clock times of work queued on a device.

On a GPU a kernel runs after the Python call that launched it has returned, so a plain
``time.perf_counter()`` around scoring would count only the launches, and the next call that
waits for the device (a ``.item()``, a copy to the host) would be charged with the whole prefill's
backlog. Reading the clock after the device has caught up charges each piece with its own work.
"""

from __future__ import annotations

import time

import torch


def device_time(device: torch.device | None) -> float:
    """``time.perf_counter()`` once ``device`` has run everything queued on it (waits on CUDA only)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
