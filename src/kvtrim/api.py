"""The library's two entry points: :func:`compress` a context once and ask it many questions, or
compress every prefill of ``model.generate`` inside :func:`compressing`.

Both take a :class:`~kvtrim.CompressionSpec` (``spec=``) or the same axes as keywords; the planner
(:mod:`kvtrim.strategies.planner`) checks the combination and picks the strategy that runs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, overload

from torch import nn

from kvtrim.budgets import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.spec import DEFAULT_RATIO, CompressionSpec
from kvtrim.engine.compressor import Compressor
from kvtrim.models.prompting import PromptLayout
from kvtrim.scorers import Scorer
from kvtrim.sessions import BatchSession, Session
from kvtrim.strategies.planner import plan, plan_generate

#: the compression keywords of :func:`compress` and their defaults (what ``spec=`` replaces)
_AXES_DEFAULTS: dict[str, Any] = {
    "method": None,
    "ratio": DEFAULT_RATIO,
    "budget": None,
    "budget_options": None,
    "chunk_size": None,
    "decode_budget": None,
    "evict_every": 16,
    "key_channels": 0.0,
    "evicted": "drop",
    "rerotate": False,
    "windows": False,
}


def resolve_spec(
    spec: CompressionSpec | str | None, options: dict[str, Any], **axes: Any
) -> tuple[CompressionSpec, Scorer | None, Budget | None]:
    """One spec from either ``spec=`` or the keyword ``axes`` and method ``options`` (never both),
    and the ready scorer / budget objects given in place of names."""
    method, budget = axes.pop("method"), axes.pop("budget")
    scorer = method if isinstance(method, Scorer) else None
    policy = budget if isinstance(budget, Budget) else None
    if spec is not None:
        changed = [
            k for k, v in {"method": method, "budget": budget, **axes}.items() if v != _AXES_DEFAULTS[k]
        ]
        if changed or options:
            both = ", ".join(changed or options)
            raise KVTrimError(f"Give the compression either as spec=... or as keywords, not both ({both}).")
        return (CompressionSpec.parse(spec) if isinstance(spec, str) else spec), None, None
    if scorer is not None and options:
        raise KVTrimError("Options cannot be given together with a ready Scorer instance.")
    if method is None:  # the default compression: its method, options and budget
        default = CompressionSpec.default()
        method, options = default.method, {**dict(default.method_options), **options}
        if budget is None and axes.get("budget_options") is None:
            budget, axes["budget_options"] = default.budget, dict(default.budget_options)
    budget = "uniform" if budget is None else budget
    built = CompressionSpec.of(
        scorer.name if scorer is not None else method,
        budget=policy.name if policy is not None else budget,
        method_options=options,
        **axes,
    )
    return built, scorer, policy


@overload
def compress(
    model: nn.Module,
    tokenizer: Any,
    context: str | PromptLayout,
    method: str | Scorer | None = ...,
    ratio: float = ...,
    **kwargs: Any,
) -> Session: ...


@overload
def compress(
    model: nn.Module,
    tokenizer: Any,
    context: Sequence[str],
    method: str | Scorer | None = ...,
    ratio: float = ...,
    **kwargs: Any,
) -> BatchSession: ...


def compress(
    model: nn.Module,
    tokenizer: Any,
    context: str | PromptLayout | Sequence[str],
    method: str | Scorer | None = None,
    ratio: float = DEFAULT_RATIO,
    *,
    spec: CompressionSpec | str | None = None,
    use_chat_template: bool | None = None,
    seed: int = 0,
    budget: str | Budget | None = None,
    budget_options: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    decode_budget: int | None = None,
    evict_every: int = 16,
    question: str | None = None,
    key_channels: float = 0.0,
    evicted: str = "drop",
    rerotate: bool = False,
    windows: bool = False,
    **options: Any,
) -> Session | BatchSession:
    """Prefill ``context`` once, compressing each layer as it goes, and return a :class:`Session`.

    ``spec`` gives every axis at once (a :class:`~kvtrim.CompressionSpec` or its string,
    ``"knorm@0.5+adaptive"``); otherwise the keywords do: ``method`` (a name, options may ride on
    it, or a ready scorer; none given: the default compression's method, options and budget,
    :data:`kvtrim.core.spec.DEFAULT_SPEC`) and its ``options``, ``ratio`` (fraction evicted, in
    [0, 1)), ``budget`` and ``budget_options``, ``chunk_size`` (compress after every chunk of the prefill),
    ``decode_budget`` / ``evict_every`` (keep evicting while answering), ``key_channels`` (ThinK),
    ``evicted`` (``"drop"``, ``"merge"`` the evicted values into their kept neighbours, or
    ``"cam"``: CaM's merging at every eviction while decoding),
    ``rerotate`` (move the kept keys to positions 0..K−1; the question continues at K),
    ``windows`` (compress sliding-window layers too, within their window).
    A list of contexts gives a :class:`~kvtrim.BatchSession`, each context keeping what it would
    keep alone. ``question=q`` compresses the question with the context (query-aware): the session
    answers that question only. A :class:`~kvtrim.models.prompting.PromptLayout` in place of the
    text is compressed exactly as laid out (its ``context_text`` is the whole prefix, template
    included: how a server keeps a conversation's own rendering). The README's Library section
    describes every axis.
    """
    resolved, scorer, policy = resolve_spec(
        spec,
        options,
        method=method,
        ratio=ratio,
        budget=budget,
        budget_options=budget_options,
        chunk_size=chunk_size,
        decode_budget=decode_budget,
        evict_every=evict_every,
        key_channels=key_channels,
        evicted=evicted,
        rerotate=rerotate,
        windows=windows,
    )
    if question is not None:
        resolved = resolved.with_(query_aware=True)
    elif resolved.query_aware:
        raise KVTrimError(
            "This spec compresses the question with the context (query-aware): pass question=...."
        )
    if isinstance(context, (str, PromptLayout)):
        single = plan(resolved, scorer=scorer, budget=policy)
        return single.run(
            model,
            tokenizer,
            context,
            single,
            use_chat_template=use_chat_template,
            seed=seed,
            question=question,
        )
    contexts = list(context)
    if not contexts:
        raise KVTrimError("Give at least one context.")
    batch = plan(resolved, scorer=scorer, budget=policy, batch_of=model)
    return batch.run(model, tokenizer, contexts, batch, use_chat_template=use_chat_template, seed=seed)


@contextmanager
def compressing(
    model: nn.Module,
    method: str | Scorer | None = None,
    ratio: float = DEFAULT_RATIO,
    *,
    spec: CompressionSpec | str | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    budget: str | Budget | None = None,
    decode_budget: int | None = None,
    evict_every: int = 16,
    key_channels: float = 0.0,
    evicted: str = "drop",
    **options: Any,
) -> Iterator[Compressor]:
    """Compress the prefill of every ``model.generate`` / forward call made inside the block.

    >>> with kvtrim.compressing(model, "knorm", ratio=0.5) as press:
    ...     out = model.generate(input_ids, max_new_tokens=20)
    >>> press.stats.kv_bytes_after

    The whole prompt (question included) is compressed, so the result is question-aware; use
    :func:`kvtrim.compress` to compress a context once and ask it many questions. RoPE positions
    stay true because ``generate`` derives them from the attention mask, not from the cache length.
    Hooks are removed when the block exits, even on an exception. ``decode_budget=N`` also keeps
    every layer at most N pairs per head while generating, evicting every ``evict_every`` tokens.
    ``key_channels`` prunes that fraction of every layer's key channels as well (ThinK);
    ``evicted="merge"`` folds evicted values into the kept ones.
    """
    resolved, scorer, policy = resolve_spec(
        spec,
        options,
        method=method,
        ratio=ratio,
        budget=budget,
        decode_budget=decode_budget,
        evict_every=evict_every,
        key_channels=key_channels,
        evicted=evicted,
    )
    generate_plan = plan_generate(resolved, scorer=scorer, budget=policy)
    compressor = Compressor(model, generate_plan.schedule(), seed=seed)
    generate_plan.prepare(model, tokenizer)
    with compressor.attached() as attached:
        yield attached
