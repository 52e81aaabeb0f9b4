"""Merge-on-evict: fold every evicted value into its most similar kept pair instead of dropping it.

Dropping a pair loses what its value carried; D2O (arXiv 2406.13035) and token merging (arXiv
2210.09461) keep part of it by averaging it into a kept neighbour. Here each evicted pair j goes
to the kept pair i of the same head whose key is most cosine-similar, with weight
w_j = max(cos(k_j, k_i), 0) (a pair unlike every kept one adds nothing), and the kept value becomes
the weighted mean of itself (weight 1) and its absorbed values. Averaging directions shrinks a
vector, so the merged value is then scaled to the weighted mean of the merged values' norms: the
value's size stays what the pairs it stands for had. Keys stay as they are (their positions are
what RoPE needs), so the cache's shape and bytes are those of plain eviction.
"""

from __future__ import annotations

import torch

#: evicted pairs compared with the kept ones at a time (bounds the similarity matrix's memory)
ROWS_PER_STEP = 4096


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Values with every evicted pair folded into its kept neighbour.

    keys, values: (B, Hkv, T, D); keep: (B, Hkv, T) boolean, True where a pair is kept.
    Returns new values (B, Hkv, T, D): kept rows merged, evicted rows as they were.
    """
    out = values.clone()
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            kept = keep[b, h].nonzero().squeeze(-1)  # (K,)
            evicted = (~keep[b, h]).nonzero().squeeze(-1)  # (T − K,)
            if len(kept) and len(evicted):
                out[b, h, kept] = _merge_head(keys[b, h], values[b, h], kept, evicted).to(values.dtype)
    return out


def _merge_head(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor
) -> torch.Tensor:
    """One head: keys, values (T, D) -> the merged values of the ``kept`` rows (K, D), float32."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)  # (T, D)
    kept_unit = unit[kept]  # (K, D)
    kept_values = values[kept].float()  # (K, D)
    weight_sum = torch.ones(len(kept), device=keys.device)  # (K,) the kept pair's own weight
    value_sum = kept_values.clone()  # (K, D)
    norm_sum = kept_values.norm(dim=-1)  # (K,)
    for start in range(0, len(evicted), ROWS_PER_STEP):
        rows = evicted[start : start + ROWS_PER_STEP]  # (R,)
        similarity, target = (unit[rows] @ kept_unit.T).max(dim=-1)  # (R,), (R,) best kept pair
        weight = similarity.clamp_min(0.0)  # (R,)
        moved = values[rows].float()  # (R, D)
        weight_sum.index_add_(0, target, weight)
        value_sum.index_add_(0, target, weight[:, None] * moved)
        norm_sum.index_add_(0, target, weight * moved.norm(dim=-1))
    mean = value_sum / weight_sum[:, None]  # (K, D)
    target_norm = norm_sum / weight_sum  # (K,) weighted mean of the merged values' norms
    scale = target_norm / mean.norm(dim=-1).clamp_min(torch.finfo(mean.dtype).tiny)  # (K,)
    return mean * scale[:, None]
