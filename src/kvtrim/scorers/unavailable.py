"""Published methods kvtrim cannot offer, and why: each needs weights trained by others that cannot
be reproduced on local text. ``kvtrim methods`` lists them, so their absence is a stated fact."""

from __future__ import annotations

from typing import NamedTuple


class Unavailable(NamedTuple):
    name: str
    paper: str
    why: str


UNAVAILABLE = (
    Unavailable(
        "restorekv",
        "RestoreKV",
        "needs its published LoRA adapters, trained for specific hub models; no local recipe reproduces them",
    ),
    Unavailable(
        "dms",
        "arXiv 2506.05345",
        "Dynamic Memory Sparsification retrains the model itself to emit eviction decisions; the "
        "threshold budget gives its inference-time rule (keep pairs scoring >= tau) with any scorer",
    ),
)
