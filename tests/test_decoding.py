"""Decoding-phase eviction: the cache stays within its budget through long generations."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, sample_text

import kvtrim
from kvtrim.cache import layer_tokens
from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.simple import StreamingLLM

DECODING_METHODS = ["knorm", "expected-attention", "qfilters", "streaming-llm"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def record_sizes(model: torch.nn.Module) -> tuple[list[list[int]], object]:
    """After every forward, the pairs held by each layer (longest head); returns (sizes, handle)."""
    sizes: list[list[int]] = []

    def hook(_module, _args, kwargs, _output):
        cache = kwargs.get("cache")
        if cache is not None:
            sizes.append([layer_tokens(layer) for layer in cache.layers])

    return sizes, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("method", DECODING_METHODS)
def test_decoding_never_exceeds_budget_and_evicts_every_k(arch, method, tokenizer):
    model = make_model(arch)
    budget, every = 48, 8
    session = kvtrim.compress(
        model, tokenizer, sample_text(150), method, 0.5, decode_budget=budget, evict_every=every
    )
    prefill_sizes = [layer_tokens(layer) for layer in session.cache.layers]
    sizes, handle = record_sizes(model)
    try:
        answer = session.answer("What is said?", max_new_tokens=40)
    finally:
        handle.remove()
    assert len(answer.token_ids) == 40  # random weights rarely emit the stop token; all steps ran
    full = [i for i, layer in enumerate(session.cache.layers) if not getattr(layer, "is_sliding", False)]
    for step in sizes:
        assert max(step[i] for i in full) <= budget
    # After the first eviction a layer drops to budget − every + 1 and regrows one pair per step.
    first_layer = [step[full[0]] for step in sizes]
    drops = [s for s in range(1, len(first_layer)) if first_layer[s] < first_layer[s - 1]]
    assert len(drops) >= 3
    assert all(first_layer[s] == budget - every + 1 for s in drops)
    assert all(b - a == every for a, b in zip(drops, drops[1:], strict=False))
    assert session.stats.decode_evictions > 0
    # the session's cache is back to its compressed prefill after the answer
    assert [layer_tokens(layer) for layer in session.cache.layers] == prefill_sizes


@pytest.mark.parametrize("method", DECODING_METHODS)
def test_budget_above_total_length_changes_nothing(method, tokenizer):
    model = make_model("llama")
    context = sample_text(120)
    plain = kvtrim.compress(model, tokenizer, context, method, 0.5).answer("Which?", max_new_tokens=12)
    roomy = kvtrim.compress(model, tokenizer, context, method, 0.5, decode_budget=500, evict_every=4)
    assert roomy.answer("Which?", max_new_tokens=12).token_ids == plain.token_ids
    assert roomy.stats.decode_evictions == 0


def test_answers_repeat_exactly_after_evicting(tokenizer):
    """Each answer starts from the compressed prefill: cache and eviction state are restored."""
    model = make_model("llama")
    session = kvtrim.compress(
        model, tokenizer, sample_text(150), "expected-attention", 0.5, decode_budget=40, evict_every=5
    )
    first = session.answer("Tell me.", max_new_tokens=30).token_ids
    session.answer("Something else entirely?", max_new_tokens=30)
    assert session.answer("Tell me.", max_new_tokens=30).token_ids == first


class RecordingStreaming(StreamingLLM):
    """StreamingLLM that keeps the key and query positions of every view it scores."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(self, view):
        self.seen.append((view.key_positions.clone(), view.query_positions.clone()))
        return super().score(view)


def test_evicted_positions_stay_true(tokenizer):
    """Scorers see each head's true positions while decoding (streaming keeps sinks + latest)."""
    model = make_model("llama")
    scorer = RecordingStreaming()
    session = kvtrim.compress(
        model, tokenizer, sample_text(100), scorer, 0.5, decode_budget=30, evict_every=6
    )
    n_prefill = len(scorer.seen)
    question = session.answer("Go on.", max_new_tokens=25)
    decoding = scorer.seen[n_prefill:]
    assert decoding
    end = session.context_length + len(tokenizer(session.layout.question_text("Go on."))["input_ids"])
    end += len(question.token_ids) - 1  # position of the last token fed to the model
    keys, queries = decoding[-1]  # (B, Hkv, T), (W,)
    assert keys.dim() == 3 and keys[0, 0, :4].tolist() == [0, 1, 2, 3]  # the sinks survive
    assert int(keys[0, 0, -1]) == int(queries[-1])  # the newest pair is the token just fed
    assert 0 <= end - int(queries[-1]) < 6  # the last eviction came within the last evict_every steps
    assert len(queries) == 32 and queries.diff().eq(1).all()  # the recent-query window
    for keys, _ in decoding:  # kept positions stay sorted and unique in every head
        assert (keys.diff(dim=-1) > 0).all()


def test_decoding_eviction_with_generate(tokenizer):
    model = make_model("llama")
    ids = torch.tensor([tokenizer(sample_text(80))["input_ids"]])
    sizes, handle = record_sizes(model)
    try:
        with (
            torch.inference_mode(),
            kvtrim.compressing(model, "knorm", ratio=0.5, decode_budget=50, evict_every=10) as press,
        ):
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
    finally:
        handle.remove()
    assert out.shape[1] == ids.shape[1] + 40
    assert max(max(s) for s in sizes[1:]) <= 50
    assert press.stats.decode_evictions > 0


def test_decoding_eviction_errors(tokenizer):
    model = make_model("llama")
    text = sample_text(60)
    with pytest.raises(KVTrimError, match="cannot evict while decoding"):
        kvtrim.compress(model, tokenizer, text, "snapkv", 0.5, decode_budget=30)
    with pytest.raises(KVTrimError, match="cannot evict while decoding"):
        kvtrim.compress(model, tokenizer, text, "none", 0.0, decode_budget=30)
    with pytest.raises(KVTrimError, match="uniform, tokens, pyramid, layers and simlayer"):
        kvtrim.compress(model, tokenizer, text, "knorm", 0.5, budget="adaptive", decode_budget=30)
    with pytest.raises(KVTrimError, match="evict_every"):
        kvtrim.compress(model, tokenizer, text, "knorm", 0.5, decode_budget=8, evict_every=9)
    with pytest.raises(KVTrimError, match="decoding budget"):
        kvtrim.compress(model, tokenizer, text, "knorm", 0.5, decode_budget=0)
