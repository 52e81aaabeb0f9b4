"""Attention over ragged layers in parts: kept pairs packed per head plus the tokens added since,
merged by log-sum-exp, against attention over the plainly concatenated keys of each head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtrim.attention import cpu_kernels, ragged
from kvtrim.attention.partial import attend, attend_written_out, merge
from kvtrim.attention.ragged import ragged_attention, reference_varlen_attn
from kvtrim.cache.ragged import RaggedLayer

H, HKV, D = 6, 3, 8


def _causal(q_len: int, n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] <= n - q_len + torch.arange(q_len)[:, None]  # (q, n)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("written_out", [False, True])
def test_two_parts_merged_equal_attention_over_their_union(q_len, written_out):
    torch.manual_seed(0)
    attend_part = attend_written_out if written_out else attend
    query = torch.randn(1, H, q_len, D)
    k1, v1 = torch.randn(1, HKV, 7, D), torch.randn(1, HKV, 7, D)
    k2, v2 = torch.randn(1, HKV, 5, D), torch.randn(1, HKV, 5, D)
    visible = _causal(q_len, 5)
    got = merge(attend_part(query, k1, v1, 0.3), attend_part(query, k2, v2, 0.3, visible))
    union = torch.cat([torch.ones(q_len, 7, dtype=torch.bool), visible], dim=1)
    expected = F.scaled_dot_product_attention(
        query, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), attn_mask=union, scale=0.3, enable_gqa=True
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [256, 2])  # one block, and queries split into blocks of 2
def test_written_out_and_kernel_log_sum_exp_agree(block):
    torch.manual_seed(1)
    query, keys, values = torch.randn(1, H, 5, D), torch.randn(1, HKV, 9, D), torch.randn(1, HKV, 9, D)
    visible = _causal(5, 9)
    kernel = attend(query, keys, values, 0.5, visible)
    written = attend_written_out(query, keys, values, 0.5, visible, block=block)
    torch.testing.assert_close(kernel.out, written.out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kernel.lse, written.lse, atol=1e-6, rtol=1e-5)


def _layer(lengths: list[int], seed: int = 0) -> tuple[RaggedLayer, list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, D, generator=generator) for n in lengths]
    values = [torch.randn(n, D, generator=generator) for n in lengths]
    return RaggedLayer(torch.cat(keys), torch.cat(values), list(lengths)), keys, values


def _per_head_reference(query, keys, values, scale):
    """query (1, H, q, D); keys/values: Hkv × (K_h + n, D) with the q new tokens last -> (1, q, H, D)."""
    group, q_len = H // HKV, query.shape[2]
    out = []
    for h in range(HKV):
        visible = _causal(q_len, keys[h].shape[0])
        q = query[:, h * group : (h + 1) * group]
        out.append(
            F.scaled_dot_product_attention(
                q, keys[h][None, None], values[h][None, None], attn_mask=visible, scale=scale, enable_gqa=True
            )
        )
    return torch.cat(out, dim=1).transpose(1, 2)


@pytest.mark.parametrize("lengths", [[4, 9, 2], [0, 6, 3]])
def test_decoding_over_a_ragged_layer_equals_each_head_over_its_own_pairs(lengths):
    """Several updates (a 3-token question, then single tokens); a head that kept nothing sees only
    the added tokens."""
    torch.manual_seed(2)
    layer, keys, values = _layer(lengths)
    for q_len in (3, 1, 1):
        new_k, new_v = torch.randn(1, HKV, q_len, D), torch.randn(1, HKV, q_len, D)
        keys = [torch.cat([k, new_k[0, h]]) for h, k in enumerate(keys)]
        values = [torch.cat([v, new_v[0, h]]) for h, v in enumerate(values)]
        key, value = layer.update(new_k, new_v)
        query = torch.randn(1, H, q_len, D)
        got = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
        torch.testing.assert_close(got, _per_head_reference(query, keys, values, 0.4), atol=1e-6, rtol=1e-5)
    assert layer.head_lengths() == [n + 5 for n in lengths]
    for h in range(HKV):
        torch.testing.assert_close(layer.head_keys[h][0], keys[h])
        torch.testing.assert_close(layer.head_values[h][0], values[h])


@pytest.mark.parametrize("lengths", [[4, 9, 2], [0, 6, 3], [1, 1, 40]])
def test_the_compiled_cpu_kernel_equals_the_per_head_path(lengths, monkeypatch):
    """The compiled kernel (both parts of every head in one call) gives the portable path's output,
    over a question's several tokens and then single ones; it is built wherever a compiler is."""
    if not cpu_kernels.has_compiler():
        pytest.skip("no C++ compiler here: kvtrim runs the portable path")
    assert cpu_kernels.cpu_kernels() is not None, "a compiler is here, so the kernel must build"
    torch.manual_seed(5)
    compiled_layer, _, _ = _layer(lengths)
    portable_layer, _, _ = _layer(lengths)
    for q_len in (4, 1, 1):
        new_k, new_v = torch.randn(1, HKV, q_len, D), torch.randn(1, HKV, q_len, D)
        query = torch.randn(1, H, q_len, D)
        key, value = compiled_layer.update(new_k, new_v)
        assert ragged._compiled_kernel_for(query, key) is not None  # up to 4 new tokens
        got = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
        key, value = portable_layer.update(new_k, new_v)
        with monkeypatch.context() as patch:
            patch.setattr(ragged, "_compiled_kernel_for", lambda query, key: None)
            expected = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_ragged_layer_holds_exactly_its_pairs_after_updates():
    layer, _, _ = _layer([5, 11, 2])
    for q_len in (4, 1, 1, 1):
        layer.update(torch.randn(1, HKV, q_len, D), torch.randn(1, HKV, q_len, D))
    assert layer.n_pairs() == 18 + 3 * 7
    assert layer.nbytes() == layer.n_pairs() * 2 * D * 4  # keys and values, float32, nothing else


def test_varlen_packing_with_log_sum_exp_equals_the_loop(monkeypatch):
    """The CUDA path's packing (all heads' kept pairs in one call, queries of any length) gives the
    per-head loop's output; the kernel is replaced by a plain reference so this runs on CPU."""
    torch.manual_seed(3)
    layer, _, _ = _layer([4, 9, 2])
    key, value = layer.update(torch.randn(1, HKV, 3, D), torch.randn(1, HKV, 3, D))
    query = torch.randn(1, H, 3, D)
    loop = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
    monkeypatch.setattr(ragged, "_varlen_kernel_for", lambda query, key: reference_varlen_attn)
    packed = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
    torch.testing.assert_close(packed, loop, atol=1e-6, rtol=1e-5)


def test_the_reference_varlen_kernel_returns_the_real_kernels_layouts():
    """The CPU stand-in must return what torch's ``varlen_attn`` returns (its fake kernel gives the
    shapes on the meta device): out (Σq, H, D) and the lse heads first, (H, Σq), with lse[h, i]
    head h of query row i over its own sequence's keys. A stand-in with the lse transposed let
    the packing pass on CPU while a GPU would have mixed the heads up."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    torch.manual_seed(4)
    n_seq, q_len, group, dim, scale = 3, 2, 4, 8, 0.3  # Σq = 6 ≠ G: a transposed lse cannot pass
    lengths = (5, 7, 3)
    cu_k = ragged.head_offsets(lengths, torch.device("cpu"), torch.int32)  # (n_seq + 1,)
    cu_q = torch.arange(0, (n_seq + 1) * q_len, q_len, dtype=torch.int32)
    q = torch.randn(n_seq * q_len, group, dim)
    k, v = torch.randn(sum(lengths), 1, dim), torch.randn(sum(lengths), 1, dim)
    aux = varlen.AuxRequest(lse=True)
    meta = [t.to("meta") for t in (q, k, v, cu_q, cu_k)]
    real_out, real_lse = varlen.varlen_attn(
        *meta, q_len, max(lengths), return_aux=aux, scale=scale, enable_gqa=True
    )
    out, lse = reference_varlen_attn(
        q,
        k,
        v,
        cu_q,
        cu_k,
        q_len,
        max(lengths),
        return_aux=aux,
        scale=scale,
        window_size=(-1, -1),
        enable_gqa=True,
    )
    assert out.shape == real_out.shape and lse.shape == real_lse.shape == (group, n_seq * q_len)
    for seq in range(n_seq):
        keys = k[cu_k[seq] : cu_k[seq + 1], 0]  # (K, D)
        for t in range(q_len):
            row = seq * q_len + t
            torch.testing.assert_close(lse[:, row], torch.logsumexp(scale * q[row] @ keys.T, dim=-1))


def test_without_a_compiler_or_with_kernels_off_the_portable_path_runs(monkeypatch, capsys):
    """No compiler (or ``KVTRIM_CPU_KERNELS=0``): no kernel, a one-line message, the per-head path."""
    torch.manual_seed(6)
    layer, _, _ = _layer([5, 11, 2])
    query = torch.randn(1, H, 1, D)
    key, value = layer.update(torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D))
    expected = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
    cpu_kernels.cpu_kernels.cache_clear()
    try:
        monkeypatch.setenv("CXX", "no-such-compiler")
        assert cpu_kernels.cpu_kernels() is None and ragged._compiled_kernel_for(query, key) is None
        assert capsys.readouterr().err.strip().splitlines() == [
            "kvtrim: no C++ compiler (no-such-compiler): the portable paths run instead"
        ]
        cpu_kernels.cpu_kernels.cache_clear()
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("KVTRIM_CPU_KERNELS", "0")
        assert cpu_kernels.cpu_kernels() is None
        got = ragged_attention(torch.nn.Module(), query, key, value, None, scaling=0.4)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    finally:
        monkeypatch.undo()
        cpu_kernels.cpu_kernels.cache_clear()
