"""``kvtrim methods``: every method and budget, one line each, with its paper."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("methods", help="list the compression methods and budgets")


def run(args: argparse.Namespace) -> int:
    from kvtrim.budgets import BUDGETS
    from kvtrim.scorers import SCORERS

    width = max(len(name) for name in [*SCORERS, *BUDGETS])
    print("Methods (--method): what to keep")
    for name, cls in SCORERS.items():
        print(f"  {name:<{width}}  {cls.summary}  [{cls.paper}]")
    print("\nBudgets (--budget): how many pairs each layer and head keeps")
    for name, cls in BUDGETS.items():
        print(f"  {name:<{width}}  {cls.summary}  [{cls.paper}]")
    print("\nKey channels (--key-channels R): prune that fraction of each layer's key channels too")
    print("  ThinK: keep the channels with the largest query·key magnitude  [arXiv 2407.21018]")
    print("\nOptions ride on the name, name:key=value[:key=value...], wherever a method or budget is")
    print("named: e.g. expected-attention:epsilon=0.01, critical:base=knorm, adaptive:alpha=0.1.")
    print("\nA whole compression is one spec (--spec): METHOD[@RATIO][+BUDGET][/PART...], the parts")
    print("being chunk=N, decode-budget=N, evict-every=K, key-channels=R and query-aware, e.g.")
    print("  expected-attention:epsilon=0.01@0.5+adaptive    knorm@0.75+tokens:tokens=512/chunk=256")
    return 0
