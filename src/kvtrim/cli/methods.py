"""``kvtrim methods``: every method and budget, one line each, with its paper."""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

from kvtrim.core.spec import DEFAULT_SPEC, EVICTED


def add_parser(sub: argparse._SubParsersAction) -> None:
    methods = sub.add_parser("methods", help="list the compression methods and budgets")
    methods.add_argument(
        "--json", action="store_true", help="one JSON object: every method and budget with its options"
    )


def _options(cls: type) -> dict[str, Any]:
    """The options a method or budget takes (its constructor's keywords) and their defaults."""
    found = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        plain = default is parameter.empty or isinstance(default, (int, float, str, bool, type(None)))
        found[name] = None if default is parameter.empty else (default if plain else repr(default))
    return found


def _listing() -> dict[str, Any]:
    from kvtrim.budgets import BUDGETS
    from kvtrim.scorers import SCORERS
    from kvtrim.scorers.unavailable import UNAVAILABLE

    def entries(registry: dict[str, type]) -> list[dict[str, Any]]:
        return [
            {"name": name, "summary": cls.summary, "paper": cls.paper, "options": _options(cls)}
            for name, cls in registry.items()
        ]

    return {
        "default": DEFAULT_SPEC,
        "methods": entries(SCORERS),
        "budgets": entries(BUDGETS),
        "evicted": list(EVICTED),
        "unavailable": [entry._asdict() for entry in UNAVAILABLE],
    }


def run(args: argparse.Namespace) -> int:
    from kvtrim.budgets import BUDGETS
    from kvtrim.scorers import SCORERS
    from kvtrim.scorers.unavailable import UNAVAILABLE

    if args.json:
        print(json.dumps(_listing(), indent=1))
        return 0
    print(f"Default compression (no --method): {DEFAULT_SPEC}\n")
    width = max(len(name) for name in [*SCORERS, *BUDGETS])
    print("Methods (--method): what to keep")
    for name, cls in SCORERS.items():
        print(f"  {name:<{width}}  {cls.summary}  [{cls.paper}]")
    print("\nBudgets (--budget): how many pairs each layer and head keeps")
    for name, cls in BUDGETS.items():
        print(f"  {name:<{width}}  {cls.summary}  [{cls.paper}]")
    print("\nKey channels (--key-channels R): prune that fraction of each layer's key channels too")
    print("  ThinK: keep the channels with the largest query·key magnitude  [arXiv 2407.21018]")
    print("\nEvicted pairs (--evicted): drop (default), merge each evicted value into the kept pair")
    print("  whose key is most similar (D2O-style; same pairs and bytes as dropping)  [arXiv 2406.13035]")
    print("  or cam: at every eviction while decoding, add each evicted value to the next kept pairs with")
    print("  probability min(1, its score / theirs) (CaM; needs a decoding budget)  [ICML 2024]")
    print("\nNot available (they need weights trained by others that local text cannot reproduce):")
    for entry in UNAVAILABLE:
        print(f"  {entry.name:<{width}}  {entry.why}  [{entry.paper}]")
    print("\nOptions ride on the name, name:key=value[:key=value...], wherever a method or budget is")
    print("named: e.g. expected-attention:epsilon=0.01, critical:base=knorm, adaptive:alpha=0.1.")
    print("\nA whole compression is one spec (--spec): METHOD[@RATIO][+BUDGET][/PART...], the parts")
    print("being chunk=N, decode-budget=N, evict-every=K, key-channels=R, evicted=merge|cam and query-aware,")
    print("e.g.")
    print("  expected-attention:epsilon=0.01@0.5+adaptive    knorm@0.75+tokens:tokens=512/chunk=256")
    return 0
