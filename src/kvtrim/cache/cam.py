"""CaM (cache merging, Zhang et al., ICML 2024): while decoding, an evicted value may live on in
the values of the pairs that follow it.

Evicting a pair that still draws attention perturbs the output; CaM adds its value, divided by
``window``, to the next ``window`` kept pairs of the same head (by position; the last ones when
none follow), with probability p = min(1, s_e / mean s_window) — the evicted pair's score
relative to the mean score of that merge window. Scores stand for the attention each pair gets
(exact with the attention scorers: TOVA, H2O / observed attention, SnapKV); negative scores count
as 0 and a window holding an always-kept pair (+inf) merges nothing. The draws come from a
generator seeded by the caller, so a run is reproducible. Keys stay as they are.
"""

from __future__ import annotations

import torch

#: kept pairs each evicted value is spread over (CaM's merge window)
CAM_WINDOW = 4


def cam_merge(
    values: torch.Tensor,
    keep: torch.Tensor,
    scores: torch.Tensor,
    generator: torch.Generator,
    window: int = CAM_WINDOW,
) -> torch.Tensor:
    """values (B, Hkv, T, D), keep (B, Hkv, T) bool, scores (B, Hkv, T) -> new values (B, Hkv, T, D):
    the kept rows with the evicted values CaM merged into them, the evicted rows as they were."""
    out = values.clone()
    draws = torch.rand(keep.shape, generator=generator).to(keep.device)  # (B, Hkv, T) one per pair
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            kept = keep[b, h].nonzero().squeeze(-1)  # (K,) ascending positions
            evicted = (~keep[b, h]).nonzero().squeeze(-1)  # (E,)
            if len(kept) and len(evicted):
                out[b, h] = _merge_head(values[b, h], scores[b, h], kept, evicted, draws[b, h], window)
    return out


def merge_windows(kept: torch.Tensor, evicted: torch.Tensor, window: int) -> torch.Tensor:
    """(E, w) indices of the ``window`` kept pairs after each evicted one (the last w when fewer follow)."""
    width = min(window, len(kept))
    start = torch.searchsorted(kept, evicted).clamp(max=len(kept) - width)  # (E,)
    return kept[start[:, None] + torch.arange(width, device=kept.device)]  # (E, w)


def _merge_head(
    values: torch.Tensor,
    scores: torch.Tensor,
    kept: torch.Tensor,
    evicted: torch.Tensor,
    draws: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """One head: values (T, D), scores (T,) -> values (T, D) with CaM's merges applied."""
    targets = merge_windows(kept, evicted, window)  # (E, w)
    attention = scores.float().clamp_min(0.0)  # (T,)
    ratio = attention[evicted] / attention[targets].mean(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    merged = draws[evicted] < ratio.nan_to_num(0.0).clamp(max=1.0)  # (E,) Bernoulli(p)
    out = values.float().clone()  # (T, D)
    share = values[evicted].float() * (merged.float() / targets.shape[1])[:, None]  # (E, D)
    out.index_add_(0, targets.flatten(), share.repeat_interleave(targets.shape[1], dim=0))
    return out.to(values.dtype)
