"""Budgets: how many pairs each layer and head keeps. A budget is one file here plus one line in
:func:`register` below."""

from kvtrim.budgets.adaptive import AdaptiveBudget
from kvtrim.budgets.base import Budget
from kvtrim.budgets.duo import DuoBudget
from kvtrim.budgets.kvcompose import KVComposeBudget
from kvtrim.budgets.layers import LayerRatiosBudget
from kvtrim.budgets.lukv import LUKVBudget
from kvtrim.budgets.pyramid import PyramidBudget
from kvtrim.budgets.registry import BUDGETS, make_budget, register
from kvtrim.budgets.simlayer import SimLayerBudget
from kvtrim.budgets.threshold import ThresholdBudget
from kvtrim.budgets.uniform import TokenBudget, UniformBudget

register(
    UniformBudget,
    TokenBudget,
    PyramidBudget,
    LayerRatiosBudget,
    AdaptiveBudget,
    ThresholdBudget,
    DuoBudget,
    SimLayerBudget,
    LUKVBudget,
    KVComposeBudget,
)

__all__ = [
    "BUDGETS",
    "AdaptiveBudget",
    "Budget",
    "DuoBudget",
    "KVComposeBudget",
    "LUKVBudget",
    "LayerRatiosBudget",
    "PyramidBudget",
    "SimLayerBudget",
    "ThresholdBudget",
    "TokenBudget",
    "UniformBudget",
    "make_budget",
]
