"""The budget registry: ``--budget NAME`` is a registered budget with default options."""

from __future__ import annotations

from typing import Any

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.options import build
from kvtrim.core.spec import parse_named

BUDGETS: dict[str, type[Budget]] = {}


def register(*classes: type[Budget]) -> None:
    for cls in classes:
        BUDGETS[cls.name] = cls


def make_budget(budget: str | Budget = "uniform", **options: Any) -> Budget:
    """Build a budget policy from its name and options (or pass a ready one through); the name may
    carry options itself: ``adaptive:alpha=0.1``."""
    if isinstance(budget, Budget):
        return budget
    name, spec_options = parse_named(budget)
    cls = BUDGETS.get(name)
    if cls is None:
        raise KVTrimError(f"Unknown budget {name!r}. Available: {', '.join(BUDGETS)}.")
    return build(cls, f"budget {name!r}", {**spec_options, **options})
