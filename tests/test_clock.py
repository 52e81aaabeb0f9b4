"""Timers of device work wait for the device: on a GPU, kernels run after Python returns."""

from pathlib import Path

import pytest
import torch

from kvtrim.core import clock

SRC = Path(clock.__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("device", "waits"),
    [
        (torch.device("cuda"), True),
        (torch.device("cuda", 1), True),
        (torch.device("cpu"), False),
        (None, False),
    ],
)
def test_device_time_waits_on_cuda_only(monkeypatch, device, waits):
    waited = []
    monkeypatch.setattr(clock.torch.cuda, "synchronize", lambda d=None: waited.append(d))
    before = clock.time.perf_counter()
    assert clock.device_time(device) >= before
    assert waited == ([device] if waits else [])


def test_compression_timers_read_the_device_clock():
    """The figures that split a prefill from its compression (and scoring from selection) are
    read with device_time: a bare perf_counter there would charge the GPU's backlog to whatever
    first waits for it."""
    files = [SRC / "generation.py"]
    for package in ("engine", "schedules", "strategies"):
        files += sorted((SRC / package).glob("*.py"))
    offenders = [f.name for f in files if "time.perf_counter" in f.read_text(encoding="utf-8")]
    assert offenders == []
