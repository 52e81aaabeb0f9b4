"""SimLayerKV's layer split (arXiv 2410.13846): lazy layers keep sinks + recent, the others keep all.

Some layers attend almost only to the first tokens and the latest ones, whatever the context
says; their cache can shrink to those without loss, while the rest keep everything. A layer is
*lazy* when the last ``n_last`` queries put more than ``lazy_threshold`` of their attention
(averaged over query heads and those queries) on the first ``n_initial`` and the last ``n_recent``
pairs. A lazy layer keeps ``n_initial + n_recent`` pairs chosen by the scorer: with
``streaming-llm`` (first tokens, then recency) exactly the paper's sinks + recent window; with
another scorer, that many of its best. The ratio is ignored: how much is saved is decided by how
many layers are lazy (the stats report it).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.budgets.base import Budget
from kvtrim.core.errors import KVTrimError
from kvtrim.core.selection import top_indices


def edge_attention_mass(view: Any, n_last: int, n_initial: int, n_recent: int) -> torch.Tensor:
    """(B,) share of the last ``n_last`` queries' attention on the first ``n_initial`` and the last
    ``n_recent`` pairs of the layer, averaged over query heads and those queries."""
    queries = view.queries(rotated=True, last=n_last).float()  # (B, H, n, D)
    keys = view.keys.float().repeat_interleave(view.group_size, dim=1)  # (B, H, T, D)
    logits = queries @ keys.transpose(-1, -2) * view.scaling  # (B, H, n, T)
    seq = keys.shape[2]
    key_idx = torch.arange(seq, device=keys.device)  # (T,)
    query_idx = torch.arange(seq - queries.shape[2], seq, device=keys.device)  # (n,) the last keys
    logits = logits.masked_fill(key_idx[None, :] > query_idx[:, None], -torch.inf)  # causal
    attention = logits.softmax(dim=-1)  # (B, H, n, T)
    edges = (key_idx < n_initial) | (key_idx >= seq - n_recent)  # (T,)
    return attention[..., edges].sum(dim=-1).mean(dim=(1, 2))  # (B,)


class SimLayerBudget(Budget):
    """Lazy layers (attention on the edges above ``lazy_threshold``) keep sinks + recent; others all."""

    name = "simlayer"
    summary = "SimLayerKV: lazy layers keep n_initial + n_recent pairs, the other layers keep all."
    paper = "arXiv 2410.13846"
    layers_alike = False
    ratio_driven = False
    needs_view = True

    def __init__(
        self, lazy_threshold: float = 0.9, n_last: int = 1, n_recent: int = 1024, n_initial: int = 4
    ):
        if not 0.0 <= lazy_threshold <= 1.0:
            raise KVTrimError(f"lazy_threshold is a share of attention in [0, 1], got {lazy_threshold}.")
        if n_last < 1 or n_recent < 1 or n_initial < 0:
            raise KVTrimError(
                "SimLayerKV needs n_last >= 1 and n_recent >= 1 queries / pairs and n_initial >= 0, "
                f"got {n_last}, {n_recent}, {n_initial}."
            )
        self.lazy_threshold = float(lazy_threshold)
        self.n_last, self.n_recent, self.n_initial = int(n_last), int(n_recent), int(n_initial)
        #: layer index -> (B,) True where that layer was judged lazy (the last compression's)
        self.lazy: dict[int, torch.Tensor] = {}

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        return None  # all or n_initial + n_recent, decided by the layer's attention

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        return n_tokens > self.n_initial + self.n_recent

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        raise RuntimeError("the simlayer budget decides from the layer's attention: use select_seen")

    def select_seen(
        self, scores: torch.Tensor, view: Any, layer_idx: int, n_layers: int, ratio: float
    ) -> torch.Tensor:
        seq = scores.shape[-1]
        lazy = edge_attention_mass(view, self.n_last, self.n_initial, self.n_recent) > self.lazy_threshold
        self.lazy[layer_idx] = lazy.cpu()
        keep = min(seq, self.n_initial + self.n_recent)
        if not lazy.any():
            return top_indices(scores, seq)  # (B, Hkv, T): everything
        if lazy.all():
            return top_indices(scores, keep)  # (B, Hkv, K)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter(2, top_indices(scores, keep), True)
        return mask | ~lazy[:, None, None].to(mask.device)  # (B, Hkv, T): batch elements differ
