"""Strategies: how a compression runs — one context, a padded batch, reconstruction scoring, one
shared prefill for many cells, cell batches — and the planner that checks a spec and picks one."""

from kvtrim.strategies import surrogates as _surrogates  # noqa: F401 - registers KVzip as a teacher
from kvtrim.strategies.cell_batch import answer_cells
from kvtrim.strategies.plan import Plan
from kvtrim.strategies.planner import plan, plan_generate
from kvtrim.strategies.shared_batch import SharedBatchPrefill, prefill_batch_once
from kvtrim.strategies.shared_prefill import SharedPrefill, prefill_once

__all__ = [
    "Plan",
    "SharedBatchPrefill",
    "SharedPrefill",
    "answer_cells",
    "plan",
    "plan_generate",
    "prefill_batch_once",
    "prefill_once",
]
