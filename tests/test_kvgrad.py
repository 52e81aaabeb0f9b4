"""KVgrad: the gradient pass against finite differences, the score against a slow reference from
its definition, and the method end to end (the cache is left as it was by the gradient pass)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_model, make_tokenizer, sample_text

import kvtrim
from kvtrim.generation import prefill
from kvtrim.models.forward import new_cache
from kvtrim.models.prompting import encode_context
from kvtrim.scorers.kvgrad import KVgrad
from kvtrim.strategies.output_gradients import output_gradient_norms

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


@contextlib.contextmanager
def pushed(model, cache, layer, head, position, push):
    """``push`` (D,) added to head ``head``'s attention output at ``position`` in ``layer``; the
    cache is put back afterwards."""
    attn = model.model.layers[layer].self_attn
    d = attn.head_dim

    def add(_module, args):
        x = args[0].clone()
        x[0, position, head * d : (head + 1) * d] += push
        return (x,)

    handle = attn.o_proj.register_forward_pre_hook(add)
    snapshot = [(layer_.keys, layer_.values) for layer_ in cache.layers]
    try:
        yield
    finally:
        handle.remove()
        for layer_, (k, v) in zip(cache.layers, snapshot, strict=True):
            layer_.keys, layer_.values = k, v


def phi(model, cache, ids, positions, n_targets):
    """Σ log p of the last ``n_targets`` tokens of ``ids`` fed after ``cache``."""
    out = model(input_ids=torch.tensor([ids]), position_ids=positions, cache=cache, use_cache=True)
    logits = out.logits[0, -n_targets - 1 : -1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[-n_targets:])[:, None]).sum()


def phi_with_push(model, cache, ids, positions, n_targets, layer, head, position, push):
    with pushed(model, cache, layer, head, position, push), torch.inference_mode():
        return float(phi(model, cache, ids, positions, n_targets))


def test_gradient_norms_match_finite_differences():
    model, tok = make_model("llama", max_positions=512), make_tokenizer()
    _, ids = encode_context(model, tok, sample_text(120), False)
    cache = new_cache(model)
    with torch.inference_mode():
        prefill(model, cache, [ids])
    before = [layer.keys.clone() for layer in cache.layers]
    probe = ids[:30]
    positions = torch.arange(len(ids), len(ids) + len(probe))[None]
    norms = output_gradient_norms(model, cache, probe, positions, n_targets=20)
    assert [layer.keys.shape for layer in cache.layers] == [b.shape for b in before]  # put back
    assert norms[1].shape == (1, model.config.num_attention_heads, len(probe))
    # the directional derivative along a random unit push equals grad · push
    gen = torch.Generator().manual_seed(0)
    for layer, head, position in [(0, 1, 5), (2, 3, 25)]:
        push = torch.randn(model.config.head_dim, generator=gen, dtype=torch.float32)
        push /= push.norm()
        eps = 1e-2
        up = phi_with_push(model, cache, probe, positions, 20, layer, head, position, eps * push)
        down = phi_with_push(model, cache, probe, positions, 20, layer, head, position, -eps * push)
        slope = abs(up - down) / (2 * eps)
        assert slope <= float(norms[layer][0, head, position]) * 1.05 + 1e-4  # |g·u| <= ‖g‖
    # and along the gradient itself the slope is the norm (Cauchy-Schwarz with equality)
    layer, head, position = 1, 0, 10
    grad_dir = _gradient_direction(model, cache, probe, positions, 20, layer, head, position)
    eps = 1e-2
    up = phi_with_push(model, cache, probe, positions, 20, layer, head, position, eps * grad_dir)
    down = phi_with_push(model, cache, probe, positions, 20, layer, head, position, -eps * grad_dir)
    assert math.isclose((up - down) / (2 * eps), float(norms[layer][0, head, position]), rel_tol=0.05)


def _gradient_direction(model, cache, ids, positions, n_targets, layer, head, position):
    """The unit gradient of Φ w.r.t. one head's attention output at one position, by autograd."""
    delta = torch.zeros(model.config.head_dim, requires_grad=True)
    with pushed(model, cache, layer, head, position, delta), torch.enable_grad():
        phi(model, cache, ids, positions, n_targets).backward()
    return (delta.grad / delta.grad.norm()).detach()


@dataclass
class Recording(KVgrad):
    """KVgrad that keeps what one reconstruction forward gave it, to check it by hand."""

    seen: list = field(default_factory=list)

    def score_reconstruction(self, view, lse, n_context):
        scores = super().score_reconstruction(view, lse, n_context)
        self.seen.append((view, self.output_gradients[view.layer_idx], scores))
        return scores


def slow_kvgrad(
    view, grads, n_context: int, n_sink: int, use_value: bool = True, use_gradient: bool = True
) -> torch.Tensor:
    """(Hkv, T): max over queries p of softmax weight · ‖v W_O^h‖ · grad norm, max over the group
    (a factor left out counts as one)."""
    queries = view.queries(rotated=True)[0].double()  # (H, q, D)
    keys, values = view.keys[0].double(), view.values[0].double()  # (Hkv, T + q, D)
    weight = view.output_weight.double()  # (H, D, hidden)
    q_len, total = queries.shape[1], keys.shape[1]
    out = torch.zeros(view.n_kv_heads, n_context, dtype=torch.float64)
    for h in range(view.n_heads):
        kv = h // view.group_size
        for p in range(q_len):
            visible = n_context + p + 1
            weights = torch.softmax(keys[kv, :visible] @ queries[h, p] * view.scaling, 0)
            for c in range(n_context):
                value = float((values[kv, c] @ weight[h]).norm()) if use_value else 1.0
                s = float(weights[c]) * value * (float(grads[0, h, p]) if use_gradient else 1.0)
                out[kv, c] = max(out[kv, c], s)
    out[:, :n_sink] = torch.inf
    assert total == n_context + q_len
    return out


@pytest.mark.parametrize("use_value,use_gradient", [(True, True), (False, True), (True, False)])
def test_kvgrad_matches_the_slow_reference_and_compresses(llama, tok, use_value, use_gradient):
    scorer = Recording(use_value=use_value, use_gradient=use_gradient)
    session = kvtrim.compress(llama, tok, sample_text(120), method=scorer, ratio=0.5)
    assert session.stats.kv_tokens_after < session.stats.kv_tokens_before
    view, grads, scores = scorer.seen[-1]
    n_context = session.context_length
    expected = slow_kvgrad(view, grads, n_context, scorer.n_sink, use_value, use_gradient)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(scores[0]), finite)
    torch.testing.assert_close(scores[0].double()[finite], expected[finite], rtol=1e-3, atol=1e-9)
    assert isinstance(session.ask("Which word?", max_new_tokens=3), str)


def test_kvgrad_without_its_two_factors_is_kvzip(llama, tok):
    context = sample_text(160)
    bare = kvtrim.compress(llama, tok, context, spec="kvgrad:use_gradient=false:use_value=false@0.5")
    kvzip = kvtrim.compress(llama, tok, context, spec="kvzip@0.5")
    for mine, theirs in zip(bare.cache.layers, kvzip.cache.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_kvgrad_is_refused_where_kvzip_is(llama, tok):
    with pytest.raises(kvtrim.KVTrimError, match="does not support chunked prefill"):
        kvtrim.compress(llama, tok, sample_text(200), spec="kvgrad@0.5/chunk=64")
