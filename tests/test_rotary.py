"""RoPE cos/sin for arbitrary positions: computed once per positions and reused by every layer,
and recomputed whenever anything they depend on changes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from kvtrim.models.adapters import attention_modules, rotary_for


def fresh(rotary, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin straight from the model's rotary embedding, nothing kept."""
    pos = positions[None]
    if rotary.takes_layer_type:
        return rotary.rotary(like, pos, rotary.layer_type)
    return rotary.rotary(like, pos)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layers_share_the_latest_cos_sin_and_they_equal_a_fresh_computation(arch):
    model = make_model(arch)
    rotaries = [rotary_for(model, attn) for attn in attention_modules(model)]
    like = torch.zeros(1, 1, 1, model.config.head_dim)
    window = torch.arange(40, 104)  # (64,)
    first = rotaries[0](window, like)
    for rotary in rotaries:
        cos, sin = rotary(window.clone(), like)  # equal positions, another tensor
        want_cos, want_sin = fresh(rotary, window, like)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        if rotary.layer_type == rotaries[0].layer_type:
            assert cos is first[0] and sin is first[1]  # computed once, not once per layer


def test_other_positions_dtype_or_an_updated_rotary_are_recomputed():
    model = make_model("llama")
    rotary = rotary_for(model, attention_modules(model)[0])
    like = torch.zeros(1, 1, 1, model.config.head_dim)
    positions = torch.arange(10, 20)
    cos, _ = rotary(positions, like)
    moved, _ = rotary(positions + 1, like)
    assert not torch.equal(moved, cos) and torch.equal(moved, fresh(rotary, positions + 1, like)[0])
    rotary(positions, like)  # the latest again, so that only the dtype differs next
    half, _ = rotary(positions, like.double())
    assert half.dtype == torch.float64 and torch.equal(half, fresh(rotary, positions, like.double())[0])
    primed, _ = rotary(positions, like)  # the latest again: each update below must be noticed
    assert rotary(positions, like)[0] is primed and torch.equal(primed, cos)
    with torch.no_grad():
        rotary.rotary.inv_freq.mul_(0.5)  # in place, as a rescaling RoPE may do
    slower, _ = rotary(positions, like)
    assert torch.equal(slower, fresh(rotary, positions, like)[0]) and not torch.equal(slower, cos)
    replaced = rotary.rotary.inv_freq * 2
    while replaced._version < rotary.rotary.inv_freq._version:  # a new tensor at the old one's
        replaced.mul_(1)  # version: only its identity tells them apart
    assert replaced._version == rotary.rotary.inv_freq._version
    rotary.rotary.inv_freq = replaced  # replaced, as dynamic RoPE does
    again, _ = rotary(positions, like)
    assert torch.equal(again, fresh(rotary, positions, like)[0])
    torch.testing.assert_close(again, cos)
