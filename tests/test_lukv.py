"""LU-KV's budget curves: the global top set by brute force, the budget following its curve, and
the whole pipeline (computed on first use, cached, and by the CLI)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_calibrate, sample_text

import kvtrim
from kvtrim.budgets import make_budget
from kvtrim.budgets.lukv import curve_at
from kvtrim.calibration import budget_curves
from kvtrim.calibration.budget_curves import RATIO_GRID, keep_shares
from kvtrim.core.errors import KVTrimError

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def slow_shares(sample: dict, n_layers: int, ratio: float) -> torch.Tensor:
    """(L, Hkv): keep the (1 − r)·N best pairs of all scored layers one by one, count per head."""
    pairs = [
        (float(scores[h, t]), idx, h)
        for idx, (_, scores) in sample.items()
        for h in range(scores.shape[0])
        for t in range(scores.shape[1])
    ]
    pairs.sort(key=lambda p: -p[0])
    n_kv, seq = next(iter(sample.values()))[1].shape
    counts = torch.zeros(n_layers, n_kv, dtype=torch.float64)
    for _, idx, h in pairs[: max(1, round((1 - ratio) * len(pairs)))]:
        counts[idx, h] += 1
    out = counts / seq
    for idx in range(n_layers):
        if idx not in sample:
            out[idx] = 1.0
    return out


def test_keep_shares_are_the_global_top_set():
    gen = torch.Generator().manual_seed(0)
    sample = {i: (None, torch.rand(2, 50, generator=gen) * (i + 1)) for i in (0, 1, 3)}  # layer 2 unscored
    shares = keep_shares(sample, 4)  # (99, 4, 2)
    for row in (0, 24, 49, 74, 98):
        torch.testing.assert_close(shares[row], slow_shares(sample, 4, float(RATIO_GRID[row])))
    assert (shares[:, 2] == 1).all()  # never compressed: keeps everything
    assert (shares[49, 3] > shares[49, 0]).all()  # the layer whose scores are higher keeps more


def test_the_budget_follows_its_curve():
    curves = torch.linspace(0.99, 0.01, 99)[:, None, None].expand(99, 2, 3).clone()  # share 1 − r
    curves[:, 1, 0] = 1.0  # one head of layer 1 keeps everything at every ratio
    budget = make_budget("lukv", curves=curves)
    assert torch.allclose(curve_at(curves, 0.5)[0], torch.full((3,), 0.5))
    assert torch.allclose(curve_at(curves, 0.005)[0], torch.full((3,), 0.995))  # towards 1 below 0.01
    assert torch.allclose(curve_at(curves, 0.255)[0], torch.full((3,), 0.745))  # between rows
    scores = torch.randn(1, 3, 40)
    mask = budget.select(scores, 1, 2, 0.5)  # (1, 3, 40)
    assert mask[0].sum(-1).tolist() == [40, 20, 20]
    for h in (1, 2):  # each head keeps its own best
        assert torch.equal(mask[0, h], scores[0, h] >= scores[0, h].topk(20).values[-1])
    assert budget.layer_keep(40, 1, 2, 0.5) == 27
    with pytest.raises(KVTrimError, match="do not fit this model"):
        budget.select(scores, 0, 5, 0.5)


def test_lukv_is_computed_on_first_use_cached_and_compresses(llama, tok):
    session = kvtrim.compress(llama, tok, sample_text(300), method="knorm", budget="lukv", ratio=0.5)
    assert budget_curves.lukv_path(llama).is_file()
    stats = session.stats
    assert 0.3 < stats.kv_tokens_after / stats.kv_tokens_before < 0.7  # about half, not exactly
    assert isinstance(session.ask("Which word?", max_new_tokens=3), str)
    curves = budget_curves.load_or_compute_lukv(llama, tok)["curves"]  # read back, verified
    assert curves.shape == (99, 3, llama.config.num_key_value_heads)
    assert (curves[1:] <= curves[:-1] + 1e-6).all()  # more eviction, fewer pairs kept


def test_calibrate_cli_computes_the_curves(tmp_path):
    result = run_calibrate(tmp_path, "lukv", sequences=3)
    assert result.returncode == 0, result.stderr
    assert "LU-KV curves (99, 3, 2)" in result.stdout
    assert "At ratio 0.5 the layers keep" in result.stdout
