"""Statistical leverage of the keys: keep the keys that span directions no other key covers.

The leverage of row t of a head's key matrix K (T × D) is diag(K (KᵀK)⁺ Kᵀ)_t = ‖U_t‖², U the left
singular vectors of K: how much of the column space rests on that key alone. High-leverage keys
are geometric outliers whose contribution to any attention output cannot be rebuilt from the
others; low-leverage keys are redundant. Compactor (Chari & Van Durme, arXiv 2507.08143) scores
tokens this way (with a random sketch and pre-RoPE keys, which a LayerView does not give); here
the leverage is exact, on the cached (post-RoPE) keys.

Computed through the D × D Gram matrix rather than a T × D SVD: KᵀK = V S² Vᵀ (eigh), so
U = K V S⁻¹ and the cost is two T·D² products, cheap for long T. In float64 (float32 on MPS,
which has no float64), directions with S below ``rcond``·S_max are treated as absent (pseudo-
inverse), so a rank-deficient K (e.g. T < D) is handled. ``center`` subtracts the mean key
first, as Compactor does, measuring outlierness around the mean rather than around the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrim.scorers.base import LayerView, Scorer

#: smallest ratio of the Cholesky factor's diagonal entries (√ of the Gram matrix's pivots) for
#: which the triangular solve is used; below it the keys are close to rank-deficient and the
#: eigendecomposition decides which directions are absent (``rcond``)
CHOLESKY_PIVOT_RATIO = 1e-5


def leverage_scores(keys: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """keys: (B, Hkv, T, D) -> (B, Hkv, T) row leverage diag(K (KᵀK)⁺ Kᵀ), in the keys' dtype.

    A well-conditioned Gram matrix KᵀK = LLᵀ gives the leverage as ‖L⁻¹k‖²: a Cholesky
    factorisation, the D × D inverse of L and one product with the keys, about half the cost of
    the eigendecomposition; otherwise its pseudo-inverse handles the absent directions.
    """
    gram = keys.transpose(-1, -2) @ keys  # (B, Hkv, D, D)
    factor, info = torch.linalg.cholesky_ex(gram)  # (B, Hkv, D, D) lower
    pivots = factor.diagonal(dim1=-2, dim2=-1)  # (B, Hkv, D)
    if not bool(info.any()) and bool((pivots.amin(-1) > CHOLESKY_PIVOT_RATIO * pivots.amax(-1)).all()):
        eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)  # (D, D)
        inverse = torch.linalg.solve_triangular(factor, eye, upper=False)  # (B, Hkv, D, D): L⁻¹
        return (keys @ inverse.transpose(-1, -2)).square().sum(dim=-1)  # (B, Hkv, T): ‖L⁻¹k‖²
    return pseudo_inverse_leverage(keys, gram, rcond)


def pseudo_inverse_leverage(keys: torch.Tensor, gram: torch.Tensor, rcond: float) -> torch.Tensor:
    """Leverage through the eigendecomposition of ``gram`` = KᵀK (B, Hkv, D, D): directions with
    S below ``rcond``·S_max count as absent. keys: (B, Hkv, T, D) -> (B, Hkv, T)."""
    eigvals, eigvecs = torch.linalg.eigh(gram)  # (B, Hkv, D), (B, Hkv, D, D); eigvals = S²
    top = eigvals.amax(dim=-1, keepdim=True)  # (B, Hkv, 1)
    present = eigvals > top * rcond**2  # (B, Hkv, D): S > rcond·S_max
    safe = eigvals.clamp_min(torch.finfo(eigvals.dtype).tiny)  # (B, Hkv, D)
    inv_s = torch.where(present, safe.rsqrt(), 0.0)  # (B, Hkv, D): 1/S, or 0 for absent directions
    u = (keys @ eigvecs) * inv_s[:, :, None, :]  # (B, Hkv, T, D), the left singular vectors
    return u.square().sum(dim=-1)  # (B, Hkv, T)


@dataclass
class Leverage(Scorer):
    """Exact leverage score of each key in its head's key matrix (higher = less redundant)."""

    name = "leverage"
    summary = "Leverage of each key in its head's key matrix: keep keys no other key can stand for."
    paper = "arXiv 2507.08143"
    center: bool = False
    rcond: float = 1e-6

    def score(self, view: LayerView) -> torch.Tensor:
        dtype = torch.float32 if view.keys.device.type == "mps" else torch.float64
        keys = view.keys.to(dtype)  # (B, Hkv, T, D)
        if self.center:
            keys = keys - keys.mean(dim=2, keepdim=True)  # (B, Hkv, T, D)
        return leverage_scores(keys, self.rcond).float()
