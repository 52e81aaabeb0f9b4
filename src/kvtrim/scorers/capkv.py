"""CAPKV (arXiv 2604.25975): keep the pairs that add the most capacity in the directions queries use.

Each pair gets a relevance weight w_i = exp(τ·⟨k̂_i, μ̂⟩) against an anchor μ of the historical
queries (their mean, turned by the RoPE rotation averaged over the next ``n_future_positions``,
as Expected Attention does, so that it lives where future queries will), keys and anchor
L2-normalised and the logits shifted by their per-head maximum. With the values standing for the
output directions u_i = v_i, the capacity matrix A = I + Σ_i w_i v_i v_iᵀ measures how well the
kept set already spans them, and a pair's score is its weighted ridge leverage
s_i = w_i · v_iᵀ A⁻¹ v_i: relevant pairs in directions no other relevant pair covers. Computed per
query head and averaged over the GQA group; the first ``n_sink`` pairs are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrim.core.errors import KVTrimError
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class CAPKV(Scorer):
    """w_i · v_iᵀ (I + Σ w v vᵀ)⁻¹ v_i with w_i = exp(τ cos(k_i, anchor of the queries))."""

    name = "capkv"
    summary = "CAPKV: query-weighted ridge leverage of the values, w = exp(tau·cos(k, query anchor))."
    paper = "arXiv 2604.25975"
    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.n_future_positions < 1:
            raise KVTrimError("n_sink must be >= 0 and n_future_positions >= 1.")

    def anchor(self, view: LayerView) -> torch.Tensor:
        """μ: (B, H, D) mean pre-RoPE query past the sinks, turned by the averaged future RoPE."""
        queries = view.queries()[:, :, self.n_sink :].float()  # (B, H, Tq − sink, D)
        start = int(view.query_positions[-1]) + 1
        future = torch.arange(start, start + self.n_future_positions, device=view.keys.device)
        mean_rotation = view.mean_rotation(future)  # (D, D)
        return queries.mean(dim=2) @ mean_rotation.T  # (B, H, D)

    def score(self, view: LayerView) -> torch.Tensor:
        bsz, n_kv, seq, dim = view.keys.shape
        scores = torch.full((bsz, n_kv, seq), torch.inf, device=view.keys.device)  # (B, Hkv, T)
        if seq <= self.n_sink or len(view.query_positions) <= self.n_sink:
            return scores
        group = view.group_size
        keys = view.keys[:, :, self.n_sink :].float()  # (B, Hkv, M, D)
        values = view.values[:, :, self.n_sink :].float()  # (B, Hkv, M, Dv)
        anchor = F.normalize(self.anchor(view), dim=-1).view(bsz, n_kv, group, dim)  # (B, Hkv, G, D)
        cosine = torch.einsum("bjgd,bjmd->bjgm", anchor, F.normalize(keys, dim=-1)).clamp(-1, 1)
        logits = self.tau * cosine  # (B, Hkv, G, M)
        weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # (B, Hkv, G, M)
        scaled = values[:, :, None] * (weights + self.epsilon).sqrt()[..., None]  # (B, Hkv, G, M, Dv)
        eye = torch.eye(values.shape[-1], device=values.device)
        capacity = eye + scaled.transpose(-1, -2) @ scaled  # (B, Hkv, G, Dv, Dv)
        # A = LLᵀ always exists (A ⪰ I), and vᵀA⁻¹v = ‖L⁻¹v‖²: one Dv × Dv inverse and one product
        # with the values, instead of a solve with M right-hand sides per query head
        factor = torch.linalg.cholesky(capacity)  # (B, Hkv, G, Dv, Dv) lower
        inverse = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)  # L⁻¹
        leverage = (values[:, :, None] @ inverse.transpose(-1, -2)).square().sum(dim=-1)  # (B, Hkv, G, M)
        scores[..., self.n_sink :] = (weights * leverage).mean(dim=2)
        return scores
