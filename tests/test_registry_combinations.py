"""Every registered scorer × budget × schedule (evicted pairs dropped or merged): the spec
round-trips, the planner accepts or refuses it with one clear error, and every accepted
combination compresses a tiny model and answers."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import sample_text

import kvtrim
from kvtrim import CompressionSpec, KVTrimError
from kvtrim.budgets import BUDGETS
from kvtrim.scorers import SCORERS
from kvtrim.strategies.planner import plan

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

#: options a budget cannot do without
BUDGET_OPTIONS = {
    "tokens": {"tokens": 40},
    "threshold": {"threshold": 0.0},
    "duo": {"sinks": 4, "window": 16},
    "layers": {"ratios": [0.25, 0.75]},
    "simlayer": {"n_recent": 16, "lazy_threshold": 0.5},
}
#: the schedule axes (and the other one-value axes) as spec fields; "batch" compresses a list of contexts
SCHEDULES = {
    "after-prefill": {},
    "chunked": {"chunk_size": 32},
    "decoding": {"decode_budget": 48, "evict_every": 8},
    "key-channels": {"key_channels": 0.5},
    "query-aware": {"query_aware": True},
    "batch": {},
    "merge": {"evicted": "merge"},
    "merge-decoding": {"evicted": "merge", "decode_budget": 48, "evict_every": 8},
    "cam": {"evicted": "cam"},
    "cam-decoding": {"evicted": "cam", "decode_budget": 48, "evict_every": 8},
    "rerotate": {"rerotate": True},
}
COMBINATIONS = [(s, b, sched) for s in SCORERS for b in BUDGETS for sched in SCHEDULES]
QUESTION = "Which word comes first?"


def spec_of(scorer: str, budget: str, schedule: str) -> CompressionSpec:
    return CompressionSpec(
        method=scorer,
        ratio=0.5,
        budget=budget,
        budget_options=BUDGET_OPTIONS.get(budget),
        **SCHEDULES[schedule],
    )


def expected_refusal(scorer: str, budget: str, schedule: str) -> str | None:
    """The rules, stated a second time from the capabilities the registries declare."""
    cls, policy = SCORERS[scorer], BUDGETS[budget]
    dense = policy.heads_alike and policy.layers_alike
    if schedule == "batch":
        if not dense:
            return "Batches work with"
        if cls.query_aware or cls.needs_reconstruction:
            return "batches do not support it"
        return None
    if cls.query_aware and schedule != "query-aware":
        return "compresses the question with the context"
    if cls.needs_reconstruction and schedule == "query-aware":
        return "takes no question"
    if schedule == "chunked" and not cls.chunkable:
        return "does not support chunked prefill"
    if schedule == "chunked" and not dense:
        return "Chunked prefill works with"
    if schedule == "key-channels" and cls.needs_reconstruction:
        return "key_channels (ThinK)"
    if schedule.endswith("decoding") and not (cls.chunkable and cls.evicts):
        return "cannot evict while decoding"
    if schedule == "rerotate" and cls.needs_reconstruction:
        return "Key re-rotation (rerotate) applies to a one-shot compression"
    if schedule == "rerotate" and not dense:
        return "Key re-rotation needs every layer and head to keep as many pairs"
    if schedule.endswith("decoding") and not policy.heads_alike:
        return "Decoding eviction works with"
    if policy.spans_layers and (schedule.endswith("decoding") or schedule == "key-channels"):
        return "evicts every layer at once after the prefill"
    if schedule == "cam":
        return "evicted=cam merges at the evictions made while decoding"
    if cls.needs_reconstruction and policy.needs_view:
        return "budget decides from the prefill's attention"
    return None


@pytest.mark.parametrize("scorer,budget,schedule", COMBINATIONS)
def test_spec_round_trips(scorer, budget, schedule):
    spec = spec_of(scorer, budget, schedule)
    text = str(spec)
    assert CompressionSpec.parse(text) == spec and str(CompressionSpec.parse(text)) == text
    assert CompressionSpec.from_dict(spec.to_dict()) == spec
    assert hash(CompressionSpec.parse(text)) == hash(spec)
    assert CompressionSpec.parse(text).digest() == spec.digest()


@pytest.mark.parametrize("scorer,budget,schedule", COMBINATIONS)
def test_every_combination_runs_or_is_refused_clearly(scorer, budget, schedule, llama, tok):
    spec = spec_of(scorer, budget, schedule)
    refusal = expected_refusal(scorer, budget, schedule)
    batch = schedule == "batch"
    context = [sample_text(140, seed=1), sample_text(90, seed=2)] if batch else sample_text(140)
    question = QUESTION if spec.query_aware else None
    if refusal is not None:
        with pytest.raises(KVTrimError, match=re.escape(refusal)) as planned:
            plan(spec, batch_of=llama if batch else None)
        assert "\n" not in str(planned.value)
        with pytest.raises(KVTrimError) as compressed:
            kvtrim.compress(llama, tok, context, spec=spec, question=question)
        assert str(compressed.value) == str(planned.value)  # the one rule, wherever it is met
        return
    session = kvtrim.compress(llama, tok, context, spec=spec, question=question)
    assert session.stats.kv_tokens_after <= session.stats.kv_tokens_before
    if batch:
        assert all(isinstance(a, str) for a in session.ask([QUESTION, QUESTION], max_new_tokens=3))
    else:
        assert isinstance(session.ask(question or QUESTION, max_new_tokens=3), str)
        assert session.spec == spec.with_(query_aware=question is not None)


def test_the_rules_refuse_something_on_every_axis():
    """The grid above reaches every rule: each kind of refusal happens at least once."""
    reasons = {expected_refusal(*combo) for combo in COMBINATIONS} - {None}
    assert len(reasons) == 14


def test_generate_refuses_what_it_cannot_do(llama):
    with pytest.raises(KVTrimError, match="kvtrim.compress"), kvtrim.compressing(llama, "kvzip", 0.5):
        pass
    with pytest.raises(KVTrimError, match="chunk_size"), kvtrim.compressing(llama, spec="knorm@0.5/chunk=32"):
        pass
    with torch.inference_mode(), kvtrim.compressing(llama, spec="snapkv@0.5+adaptive") as press:
        llama.generate(torch.tensor([[5, 6, 7, 8, 9, 10]]), max_new_tokens=2, do_sample=False)
    assert press.stats.layers_compressed == llama.config.num_hidden_layers


def test_spec_and_keywords_do_not_mix(llama, tok):
    with pytest.raises(KVTrimError, match="not both"):
        kvtrim.compress(llama, tok, "text", spec="knorm@0.5", ratio=0.25)
    with pytest.raises(KVTrimError, match="not both"):
        kvtrim.compress(llama, tok, "text", spec="knorm@0.5", epsilon=0.1)
    with pytest.raises(KVTrimError, match="query-aware"):
        kvtrim.compress(llama, tok, "text", spec="snapkv@0.5/query-aware")
