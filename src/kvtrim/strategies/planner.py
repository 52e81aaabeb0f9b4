"""The planner: every rule about which axes of a compression combine, in one place, with one
clear error each — and the strategy that runs what it accepts.

Scorers and budgets declare what they can do (``Scorer.chunkable``, ``Budget.heads_alike``, ...);
only this module reads those declarations, so nothing else in the pipeline tests types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kvtrim.budgets import BUDGETS, Budget, make_budget
from kvtrim.cache.layers import has_pruned_channels, is_sliding, layer_batch_size
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import CompressionSpec, parse_named
from kvtrim.models.adapters import has_sliding_layers
from kvtrim.scorers import SCORERS, Scorer, make_scorer
from kvtrim.sessions.session import Session
from kvtrim.strategies.padded_batch import compress_batch
from kvtrim.strategies.plan import Plan
from kvtrim.strategies.reconstruction import compress_by_reconstruction
from kvtrim.strategies.single import compress_single


def plan(
    spec: CompressionSpec,
    *,
    scorer: Scorer | None = None,
    budget: Budget | None = None,
    batch_of: nn.Module | None = None,
) -> Plan:
    """Check ``spec`` and pick its strategy. ``scorer`` / ``budget`` are ready objects standing
    for the spec's method / budget (e.g. a scorer subclass, a budget with given calibration);
    ``batch_of=model`` plans a left-padded batch of contexts for that model."""
    batch = batch_of is not None
    if batch:
        check_batch_axes(spec)
    scorer = scorer if scorer is not None else make_scorer(spec.method, **dict(spec.method_options))
    policy = budget if budget is not None else make_budget(spec.budget, **dict(spec.budget_options))
    if batch:
        check_batchable(batch_of, policy)
        check_batch_method(scorer)
    check_question(scorer, spec.query_aware)
    if spec.chunk_size is not None:
        check_chunked(scorer, policy)
    check_key_channels(spec, scorer)
    if spec.decode_budget is not None:
        check_decoding(scorer, policy)
    if spec.rerotate:
        check_rerotate(spec, scorer, policy)
    if policy.spans_layers:
        check_spans_layers(spec, policy)
    if spec.windows:
        check_windows(spec, scorer, policy)
    if spec.evicted == "cam" and spec.decode_budget is None:
        raise KVTrimError(
            "evicted=cam merges at the evictions made while decoding: give a decoding budget "
            "(decode-budget=N); for the prefill's eviction use evicted=merge."
        )
    if scorer.needs_reconstruction and policy.needs_view:
        raise KVTrimError(
            f"The {policy.name!r} budget decides from the prefill's attention, which {scorer.name!r} "
            "does not score in (it scores after the prefill, by reconstruction)."
        )
    if batch:
        run = compress_batch
    elif scorer.needs_reconstruction:
        run = compress_by_reconstruction
    else:
        run = compress_single
    kvtrim_attention = needs_kvtrim_attention(policy, spec.key_channels) or spec.windows
    return Plan(spec, scorer, policy, run, kvtrim_attention)


def plan_generate(
    spec: CompressionSpec, *, scorer: Scorer | None = None, budget: Budget | None = None
) -> Plan:
    """A plan for ``model.generate`` (:func:`kvtrim.compressing`): the prompt's own prefill, one shot."""
    resolved = plan(spec, scorer=scorer, budget=budget)
    if resolved.scorer.needs_reconstruction:
        raise KVTrimError(
            f"Method {resolved.scorer.name!r} scores a context with extra forwards after its prefill, which "
            "generate() does not allow; use kvtrim.compress(model, tokenizer, context, ...) instead."
        )
    if spec.chunk_size is not None:
        raise KVTrimError(
            "generate() prefills its prompt in one forward; use kvtrim.compress(..., chunk_size=N)."
        )
    if spec.rerotate:
        raise KVTrimError(
            "generate() places new tokens by the prompt's true length; key re-rotation needs "
            "kvtrim.compress(...), whose session continues at the kept count."
        )
    return resolved


# --- the rules --------------------------------------------------------------------------------


def needs_kvtrim_attention(budget: Budget, key_channels: float) -> bool:
    """Ragged heads, layers of different lengths and pruned key channels need kvtrim's attention."""
    return not _dense(budget) or bool(key_channels)


def check_question(scorer: Scorer, query_aware: bool, label: str | None = None) -> None:
    """A query-aware scorer needs the question; a reconstruction scorer refuses one."""
    name = label or scorer.name
    if scorer.query_aware and not query_aware:
        raise KVTrimError(
            f"Method {name!r} needs the question while compressing (it compresses the question with the "
            "context): pass question=... (kvtrim ask does so for each -q)."
        )
    if scorer.needs_reconstruction and query_aware:
        raise KVTrimError(f"Method {name!r} reconstructs the context alone; it takes no question.")


def check_chunked(scorer: Scorer, budget: Budget) -> None:
    if not scorer.chunkable:
        names = ", ".join(name for name, cls in SCORERS.items() if cls.chunkable)
        raise KVTrimError(f"Method {scorer.name!r} does not support chunked prefill; these do: {names}.")
    if not _dense(budget):
        raise KVTrimError(f"Chunked prefill works with the {_budget_names(_dense)} budgets.")


def check_decoding(scorer: Scorer, budget: Budget) -> None:
    """Decoding-phase eviction needs per-head positions and dense (not ragged) heads."""
    if not (scorer.chunkable and scorer.evicts):
        names = ", ".join(name for name, cls in SCORERS.items() if cls.chunkable and cls.evicts)
        raise KVTrimError(f"Method {scorer.name!r} cannot evict while decoding; these can: {names}.")
    if not budget.heads_alike:  # a budget spanning layers is refused in check_spans_layers
        names = _budget_names(lambda b: b.heads_alike and not b.spans_layers)
        raise KVTrimError(f"Decoding eviction works with the {names} budgets.")


def check_rerotate(spec: CompressionSpec, scorer: Scorer, budget: Budget) -> None:
    """Re-rotated keys form one contiguous prefix: every layer and head must keep as many pairs,
    compressed once, with whole keys (RoPE turns pairs of channels)."""
    if (
        spec.chunk_size is not None
        or spec.decode_budget is not None
        or spec.key_channels
        or scorer.needs_reconstruction
    ):
        raise KVTrimError(
            "Key re-rotation (rerotate) applies to a one-shot compression during the prefill; it "
            f"does not combine with chunked prefill, decoding eviction, key channels or {scorer.name!r}'s "
            "scoring after the prefill."
        )
    if not _dense(budget):
        raise KVTrimError(
            f"Key re-rotation needs every layer and head to keep as many pairs: the {_budget_names(_dense)} "
            f"budgets, not {budget.name!r}."
        )


def check_windows(spec: CompressionSpec, scorer: Scorer, budget: Budget) -> None:
    """Windows are compressed once, in the prefill's own pass, layer by layer."""
    if (
        spec.chunk_size is not None
        or spec.decode_budget is not None
        or spec.key_channels
        or spec.query_aware
        or spec.rerotate
        or scorer.needs_reconstruction
        or budget.spans_layers
    ):
        raise KVTrimError(
            "Compressing sliding-window layers (windows) applies to a one-shot compression during the "
            "prefill, layer by layer; it does not combine with chunked prefill, decoding eviction, key "
            f"channels, query-aware compression, key re-rotation, scoring after the prefill ({scorer.name!r} "
            "does if it reconstructs) or a budget chosen across layers."
        )


def check_spans_layers(spec: CompressionSpec, budget: Budget) -> None:
    """A budget weighing all layers together evicts once, after the whole prefill was scored."""
    if spec.decode_budget is not None or spec.key_channels:
        raise KVTrimError(
            f"The {budget.name!r} budget evicts every layer at once after the prefill; it does not "
            "combine with decoding eviction or key channels."
        )


def check_key_channels(spec: CompressionSpec, scorer: Scorer) -> None:
    if spec.key_channels and (
        spec.chunk_size is not None or scorer.needs_reconstruction or spec.decode_budget is not None
    ):
        raise KVTrimError(
            "key_channels (ThinK) prunes each layer's key channels during a one-shot prefill; it does "
            f"not combine with chunked prefill, decoding eviction or {scorer.name!r}'s scoring after "
            "the prefill."
        )


def check_batch_axes(spec: CompressionSpec) -> None:
    if (
        spec.chunk_size is not None
        or spec.decode_budget is not None
        or spec.query_aware
        or spec.key_channels
        or spec.evicted != "drop"
        or spec.rerotate
        or spec.windows
    ):
        raise KVTrimError(
            "Batches do not support chunked prefill, decoding eviction, query-aware compression, "
            "key-channel pruning, merging evicted pairs, key re-rotation or compressed windows yet."
        )


def check_batch_method(scorer: Scorer) -> None:
    if scorer.query_aware or scorer.needs_reconstruction:
        raise KVTrimError(
            f"Method {scorer.name!r} needs its own prefill per context (a question, or a "
            "reconstruction pass); batches do not support it yet."
        )


def check_batchable(model: nn.Module, budget: Budget) -> None:
    """Refuse what one dense left-padded cache per layer cannot hold."""
    if not _dense(budget):
        raise KVTrimError(
            f"Batches work with the {_budget_names(_dense)} budgets, not {budget.name!r}; "
            "compress the contexts one at a time for that budget."
        )
    if has_sliding_layers(model):
        raise KVTrimError(
            "This model has sliding-window layers, which batches do not support yet; "
            "compress the contexts one at a time."
        )


def batchable(model: nn.Module, budget: Budget, scorer: Scorer, has_question: bool) -> bool:
    """Whether a cell can run in a left-padded batch of samples (the bench asks)."""
    if not has_question or scorer.query_aware or scorer.needs_reconstruction:
        return False
    try:
        check_batchable(model, budget)
    except KVTrimError:
        return False
    return True


def check_cell_batch(sessions: Sequence[Session]) -> None:
    """Refuse sessions that cannot share one question's batch (clear reasons, before any work):
    one model and context, one layout and question, and layers a cell batch can stack."""
    if not sessions:
        raise KVTrimError("No session to answer.")
    first = sessions[0]
    for session in sessions:
        if session.model is not first.model or session.context_length != first.context_length:
            raise KVTrimError("A cell batch needs sessions of the same model and context.")
        if session.first_position != first.first_position:
            raise KVTrimError("A cell batch cannot mix re-rotated sessions with others.")
        if session.layout != first.layout:
            raise KVTrimError("A cell batch needs sessions laid out alike (same prompt template).")
        if session.question != first.question:
            raise KVTrimError("Query-aware sessions of one batch must hold the same question.")
        if session.evicts_while_decoding:
            raise KVTrimError("A session evicting while decoding cannot be batched.")
        if len(session.cache.layers) != len(first.cache.layers):
            raise KVTrimError("A cell batch needs sessions with as many cache layers.")
        for layer, first_layer in zip(session.cache.layers, first.cache.layers, strict=True):
            _check_stackable_layer(layer, first_layer)


def _check_stackable_layer(layer: Any, first: Any) -> None:
    if has_pruned_channels(layer):
        raise KVTrimError("A cell batch cannot hold keys with pruned channels (ThinK).")
    if is_sliding(layer) and not (
        is_sliding(first) and torch.equal(layer.keys, first.keys) and torch.equal(layer.values, first.values)
    ):
        raise KVTrimError("A cell batch holds sliding-window layers only when every session has the same.")
    if layer_batch_size(layer) != 1:
        raise KVTrimError("A cell batch stacks single-context sessions (batch size 1).")


def check_sweep_budget(label: str) -> Budget:
    """A budget a sweep over ratios can use: one the ratio drives."""
    name = parse_named(label)[0]
    cls = BUDGETS.get(name)
    if cls is not None and not cls.ratio_driven:
        swept = ", ".join(n for n, c in BUDGETS.items() if c.ratio_driven)
        raise KVTrimError(
            f"The {name!r} budget ignores the ratio, which the bench sweeps; --budgets takes "
            f"{swept}. Try it with `kvtrim ask --budget {name}` instead."
        )
    return make_budget(label)


def check_shared_scorers(scorers: Mapping[str, Scorer], question: str | None) -> None:
    """Scorers sharing one prefill: query-aware ones need its question, reconstruction ones refuse it."""
    for name, scorer in scorers.items():
        check_question(scorer, question is not None, name)


def scorer_map(methods: Iterable[str | Scorer] | Mapping[str, Scorer]) -> dict[str, Scorer]:
    """Scorers keyed by label: names (with options) or ready scorers (keyed by their name)."""
    if isinstance(methods, Mapping):
        return dict(methods)
    out: dict[str, Scorer] = {}
    for method in methods:
        scorer = make_scorer(method)
        out[method if isinstance(method, str) else scorer.name] = scorer
    return out


def budget_map(budgets: Iterable[str | Budget] | Mapping[str, Budget]) -> dict[str, Budget]:
    """Budgets keyed by label (names with options, or ready budgets keyed by their name)."""
    if isinstance(budgets, Mapping):
        out = {name: make_budget(b) for name, b in budgets.items()}
    else:
        out = {}
        for budget in budgets:
            policy = make_budget(budget)
            out[budget if isinstance(budget, str) else policy.name] = policy
    if not out:
        raise KVTrimError("No budget to compress with; give at least one (e.g. 'uniform').")
    return out


def _dense(budget: Budget | type[Budget]) -> bool:
    """Every layer and head keeps as many pairs: one dense tensor per layer, one mask for all."""
    return budget.heads_alike and budget.layers_alike


def _budget_names(capable: Any) -> str:
    """'uniform and tokens': the registered budgets whose class passes ``capable``."""
    names = [name for name, cls in BUDGETS.items() if capable(cls)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
