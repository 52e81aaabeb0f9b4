"""ThinK key-channel pruning: channel scores against a slow reference, attention on pruned keys
against a dense reference that zeroes the pruned channels of the queries, exact byte counts."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from cli_runner import run_here
from conftest import make_model, make_tokenizer, sample_text
from test_methods import Spy
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvtrim
from kvtrim.attention import kvtrim_attention
from kvtrim.cache import cache_bytes, layer_bytes
from kvtrim.cache.channels import ChannelPrunedLayer
from kvtrim.cache.ragged import RaggedLayer
from kvtrim.core.errors import KVTrimError
from kvtrim.core.ratios import n_keep, n_keep_channels
from kvtrim.models.prompting import encode
from kvtrim.scorers.channels import channel_scores, kept_channels

ZEROED = "kvtrim_test_zero_query_channels"
#: layer -> (B, Hkv, Dk) channels whose query entries stay; the others are zeroed
_keep_channels: dict[int, torch.Tensor] = {}


def _zero_query_channels(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Dense reference: q·k over the kept channels = q with the pruned channels zeroed, then q·k."""
    channels = _keep_channels.get(module.layer_idx)
    if channels is not None:
        bsz, heads, _, dim = query.shape
        keep = torch.zeros(bsz, channels.shape[1], dim, dtype=query.dtype)  # (B, Hkv, D)
        keep.scatter_(2, channels, 1.0)
        keep = keep.repeat_interleave(heads // channels.shape[1], dim=1)[:, :, None]  # (B, H, 1, D)
        query = query * keep
    return kvtrim_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


AttentionInterface.register(ZEROED, _zero_query_channels)
AttentionMaskInterface.register(ZEROED, sdpa_mask)


pytestmark = pytest.mark.usefixtures("one_thread")


def slow_channel_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Hkv, D) float64: ‖Q_group[:, c] K[:, c]ᵀ‖_F, the Frobenius norm of the explicit outer product."""
    q, k = queries[0].double(), keys[0].double()  # (H, W, D), (Hkv, T, D)
    n_kv, _, dim = k.shape
    group = q.shape[0] // n_kv
    out = torch.zeros(n_kv, dim, dtype=torch.float64)
    for j in range(n_kv):
        rows = torch.cat([q[j * group + g] for g in range(group)])  # (G·W, D)
        for c in range(dim):
            out[j, c] = torch.outer(rows[:, c], k[j, :, c]).norm()
    return out


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])
def test_compress_keeps_the_channels_of_the_slow_reference(arch):
    """End to end: the engine's window queries and stored keys give the reference's channels."""
    model, tok = make_model(arch), make_tokenizer()
    spy = Spy()  # scores = positions: the most recent half is kept
    session = kvtrim.compress(model, tok, sample_text(120), method=spy, ratio=0.5, key_channels=0.4)
    views = iter(spy.views)
    pruned = 0
    for layer in session.cache.layers:
        if getattr(layer, "is_sliding", False):
            assert not hasattr(layer, "key_channels")
            continue
        view = next(views)
        seq = view.keys.shape[2]
        kept_keys = view.keys[:, :, seq - n_keep(seq, 0.5) :]  # (B, Hkv, K, D)
        window = view.queries(rotated=True)[:, :, -32:]  # (B, H, 32, D)
        expected = slow_channel_scores(window, kept_keys)
        torch.testing.assert_close(
            channel_scores(window, kept_keys.float().norm(dim=2))[0].double(), expected, rtol=1e-5, atol=1e-6
        )
        dk = n_keep_channels(view.head_dim, 0.4)
        assert torch.equal(layer.key_channels[0], top_sorted(expected, dk))
        assert torch.equal(
            layer.keys,
            torch.gather(kept_keys, 3, layer.key_channels[:, :, None].expand(-1, -1, kept_keys.shape[2], -1)),
        )
        pruned += 1
    assert pruned == len(spy.views)


def forward_logits(model, cache, ids: list[int], start: int, n_decode: int = 3) -> torch.Tensor:
    """Logits of a multi-token forward then ``n_decode`` greedy single-token steps: (q + n_decode, V)."""
    rows = []
    position = start
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n_decode + 1):
            positions = torch.arange(position, position + tokens.shape[1])[None]
            logits = model(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True).logits[0]
            rows.append(logits)
            position += tokens.shape[1]
            tokens = logits[-1:].argmax(-1)[None]  # (1, 1)
    return torch.cat(rows)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize(
    ("method", "ratio", "budget"),
    [("none", 0.0, "uniform"), ("knorm", 0.5, "uniform"), ("knorm", 0.5, "adaptive")],
)
def test_attention_on_pruned_keys_equals_zeroed_query_channels(arch, method, ratio, budget):
    model, tok = make_model(arch), make_tokenizer()
    context = sample_text(150, seed=5)
    dense = kvtrim.compress(model, tok, context, method=method, ratio=ratio, budget=budget)
    pruned = kvtrim.compress(model, tok, context, method=method, ratio=ratio, budget=budget, key_channels=0.5)
    _keep_channels.clear()
    for idx, layer in enumerate(pruned.cache.layers):
        if getattr(layer, "key_channels", None) is not None:
            _keep_channels[idx] = layer.key_channels
            assert layer.key_channels.shape[-1] == n_keep_channels(16, 0.5)
    assert _keep_channels
    ids = encode(tok, pruned.layout.question_text("Which word comes first?"))
    got = forward_logits(model, pruned.cache, ids, pruned.context_length)
    implementation = model.config._attn_implementation
    model.set_attn_implementation(ZEROED)
    try:
        expected = forward_logits(model, dense.cache, ids, dense.context_length)
    finally:
        model.set_attn_implementation(implementation)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the pruning matters: the unpruned cache gives other logits
    assert not torch.allclose(forward_logits(model, dense.cache, ids, dense.context_length), got, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keeping_every_channel_gives_the_models_own_logits(arch):
    """Ratio 0 through the pruned path (gather of all D channels, pruned updates) changes nothing."""
    model, tok = make_model(arch), make_tokenizer()
    context = sample_text(100, seed=6)
    session = kvtrim.compress(model, tok, context, method="none", ratio=0.0, key_channels=1e-3)
    assert any(isinstance(layer, ChannelPrunedLayer) for layer in session.cache.layers)
    assert all(layer.keys.shape[-1] == 16 for layer in session.cache.layers)
    ids = encode(tok, session.layout.question_text("What?"))
    got = forward_logits(model, session.cache, ids, session.context_length, n_decode=0)
    full = encode(tok, session.layout.context_text, session.layout.add_special_tokens) + ids
    with torch.inference_mode():
        own = model(input_ids=torch.tensor([full])).logits[0, -len(ids) :]
    torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-5)


def test_bytes_count_the_kept_elements_exactly():
    model, tok = make_model("qwen3"), make_tokenizer()
    session = kvtrim.compress(model, tok, sample_text(200), method="knorm", ratio=0.5, key_channels=0.25)
    seq = session.context_length
    keep, dk, dim = n_keep(seq, 0.5), n_keep_channels(16, 0.25), 16
    for layer in session.cache.layers:
        assert layer.keys.shape == (1, 2, keep, dk) and layer.values.shape == (1, 2, keep, dim)
        assert layer_bytes(layer) == 2 * keep * (dk + dim) * 4 + 2 * dk * 8  # keys + values + int64 indices
    stats = session.stats
    assert stats.kv_bytes_after == cache_bytes(session.cache)
    assert stats.kv_bytes_before == 3 * 2 * seq * 2 * dim * 4
    first = session.ask("Repeat.", max_new_tokens=5)  # decodes several tokens, then restores the cache
    assert cache_bytes(session.cache) == stats.kv_bytes_after
    assert session.ask("Repeat.", max_new_tokens=5) == first


def test_ragged_layers_prune_channels_per_head():
    model, tok = make_model("llama"), make_tokenizer()
    session = kvtrim.compress(
        model, tok, sample_text(200), method="knorm", ratio=0.5, budget="adaptive", key_channels=0.5
    )
    for layer in session.cache.layers:
        assert isinstance(layer, RaggedLayer)
        assert all(k.shape[-1] == 8 for k in layer.head_keys)
        expected = (
            sum(k.numel() * 4 for k in layer.head_keys)
            + sum(v.numel() * 4 for v in layer.head_values)
            + 2 * 8 * 8
        )
        assert layer.nbytes() == expected
    assert session.stats.kv_bytes_after == cache_bytes(session.cache)
    session.ask("What?", max_new_tokens=4)


def test_channel_ties_and_rounding():
    queries = torch.ones(1, 4, 2, 8)  # (B, H, W, D)
    norms = torch.ones(1, 2, 8)
    assert kept_channels(queries, norms, 0.5).tolist() == [[[4, 5, 6, 7]] * 2]  # ties: later channels
    norms[0, 1, 0] = 2.0
    assert kept_channels(queries, norms, 0.5).tolist() == [[[4, 5, 6, 7], [0, 5, 6, 7]]]
    assert n_keep_channels(128, 0.3) == 128 - math.floor(0.3 * 128)


def test_errors():
    model, tok = make_model("llama"), make_tokenizer()
    for bad in (1.0, -0.1, "x"):
        with pytest.raises(KVTrimError, match="key_channels"):
            kvtrim.compress(model, tok, sample_text(60), method="knorm", key_channels=bad)
    with pytest.raises(KVTrimError, match="chunked prefill"):
        kvtrim.compress(model, tok, sample_text(60), method="knorm", chunk_size=16, key_channels=0.5)
    with pytest.raises(KVTrimError, match="kvzip"):
        kvtrim.compress(model, tok, sample_text(60), method="kvzip", key_channels=0.5)


def test_cli_key_channels(tmp_path):
    path = tmp_path / "tiny"
    make_model("llama", max_positions=256).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    doc = tmp_path / "doc.txt"
    doc.write_text(sample_text(150))

    def ask(*flags: str) -> subprocess.CompletedProcess:
        args = [
            "ask",
            str(doc),
            "-q",
            "q?",
            "--model",
            str(path),
            "--method",
            "knorm",
            "--json",
            "--max-new-tokens",
            "2",
        ]
        return run_here(*args, *flags)

    plain, pruned = ask(), ask("--key-channels", "0.5")
    assert plain.returncode == 0 and pruned.returncode == 0, pruned.stderr
    plain_report, pruned_report = json.loads(plain.stdout), json.loads(pruned.stdout)
    assert pruned_report["key_channels"] == 0.5
    assert pruned_report["kv_bytes_after"] < plain_report["kv_bytes_after"]
    bad = ask("--key-channels", "1.5")
    assert bad.returncode == 2 and "key_channels" in bad.stderr and "Traceback" not in bad.stderr


def test_compressing_generate_with_pruned_channels():
    model, tok = make_model("llama"), make_tokenizer()
    ids = torch.tensor([encode(tok, sample_text(120))])
    with kvtrim.compressing(model, "knorm", 0.5) as plain:
        expected_len = model.generate(ids, max_new_tokens=4, do_sample=False).shape[1]
    with kvtrim.compressing(model, "knorm", 0.5, key_channels=0.5) as press:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == expected_len
    assert press.stats.kv_bytes_after < plain.stats.kv_bytes_after
