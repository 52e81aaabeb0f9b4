"""What a budget is: given one layer's scores, which pairs each head keeps — and what it can do.

A budget returns either sorted indices (B, Hkv, K) (every head keeps the same count) or a boolean
keep mask (B, Hkv, T) (heads keep different counts, stored ragged by the cache). Its capabilities
are class attributes, read by the planner alone (:mod:`kvtrim.strategies.planner`), so nothing
else in the pipeline tests budget types.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvtrim.core.ratios import n_keep


class Budget:
    """Base class: decide the kept set of one layer from its scores."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = "-"
    #: every head of a layer keeps as many pairs (a dense layer; batches and decoding need it)
    heads_alike: ClassVar[bool] = True
    #: every layer keeps as many pairs (one attention mask fits all layers; batches need it)
    layers_alike: ClassVar[bool] = True
    #: the ratio decides the count (a sweep over ratios means something)
    ratio_driven: ClassVar[bool] = True
    #: the choice needs the layer itself (its queries and keys), not only the scores: the engine
    #: then calls :meth:`select_seen` with the scorer's ``LayerView`` (SimLayerKV's lazy layers)
    needs_view: ClassVar[bool] = False
    #: the choice weighs every layer's scores together (KVCompose's global budget): the layers are
    #: scored during the prefill and evicted once all are, through :meth:`select_layers`
    spans_layers: ClassVar[bool] = False

    def setup(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Prepare model-specific data once (e.g. a calibrated head split); default: nothing."""

    def select(self, scores: torch.Tensor, layer_idx: int, n_layers: int, ratio: float) -> torch.Tensor:
        """scores: (B, Hkv, T) -> (B, Hkv, K) sorted indices, or a (B, Hkv, T) boolean keep mask."""
        raise NotImplementedError

    def select_seen(
        self, scores: torch.Tensor, view: Any, layer_idx: int, n_layers: int, ratio: float
    ) -> torch.Tensor:
        """:meth:`select` for a budget that ``needs_view``; ``view`` is the layer's ``LayerView``."""
        return self.select(scores, layer_idx, n_layers, ratio)

    def select_layers(self, scores: dict[int, torch.Tensor], ratio: float) -> dict[int, torch.Tensor]:
        """For a budget that ``spans_layers``: every scored layer's scores (B, Hkv, T_l) -> its
        choice, as :meth:`select` would give it."""
        raise NotImplementedError

    def evicts(self, n_tokens: int, ratio: float) -> bool:
        """False when this budget keeps everything (the engine then skips scoring)."""
        return n_keep(n_tokens, ratio) < n_tokens

    def layer_keep(self, n_tokens: int, layer_idx: int, n_layers: int, ratio: float) -> int | None:
        """Pairs per head this budget keeps in the layer (their mean if heads differ), None when
        it depends on the scores themselves. Scorers see it as ``LayerView.budget_keep``."""
        return n_keep(n_tokens, ratio)

    def per_chunk(self, n_tokens: int, ratio: float) -> Budget | None:
        """The fixed budget chunked prefill evicts to after every chunk (the final one for a
        context of ``n_tokens``), or None when this budget has none."""
        return None
