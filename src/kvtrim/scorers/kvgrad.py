"""KVgrad: KVzip's reconstruction, with each attention weight scaled by what it moves.

KVzip keeps a pair if some reconstruction query attends to it. Attention alone ignores how much
the pair's value changes the output and how much that output matters to the reconstruction.
KVgrad scores a context pair c of query head h by input × gradient attribution:

    S_c^h = max_p A^h_{p,c} · ‖v_c W_O^h‖ · ‖∂Φ/∂a_p^h‖

over the reconstruction queries p, with A the attention weight, v_c W_O^h the pair's value
through the head's slice of the output projection (what it adds to the layer's output), and
∂Φ/∂a_p^h the gradient of the reconstruction's log-likelihood Φ with respect to head h's
attention output at p (:mod:`kvtrim.strategies.output_gradients`: one extra forward and backward
per reconstruction input). A kv-head takes the max over its query heads; the first ``n_sink``
pairs are kept, as in KVzip. ``use_value`` / ``use_gradient`` drop a factor, to measure what each
one does (both off is KVzip's score; the backward pass runs all the same). The backward pass
makes it costlier than KVzip's reconstruction (4.8× its scoring time at 2k tokens on CPU,
docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvtrim.scorers.attention import attention_probs
from kvtrim.scorers.base import LayerView
from kvtrim.scorers.kvzip import KVzip


@dataclass
class KVgrad(KVzip):
    """max_p attention · ‖value through W_O‖ · ‖∂Φ/∂attention output‖ over KVzip's reconstruction."""

    name = "kvgrad"
    summary = "KVzip's reconstruction attention × value's output norm × gradient of the log-likelihood."
    paper = "input × gradient over KVzip (arXiv 2505.23416)"
    needs_output_gradients: ClassVar[bool] = True
    #: weigh each pair by ‖v_c W_O^h‖ / each query by ‖∂Φ/∂a_p^h‖ (off: a factor of one)
    use_value: bool = True
    use_gradient: bool = True
    #: layer -> (B, H, q) ‖∂Φ/∂a‖ of the current reconstruction forward (set by the strategy)
    output_gradients: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def score_reconstruction(self, view: LayerView, lse: torch.Tensor | None, n_context: int) -> torch.Tensor:
        grads = self.output_gradients.get(view.layer_idx)
        if grads is None:
            raise RuntimeError(
                "KVgrad scores a reconstruction forward after its gradient pass (the strategy's)."
            )
        if view.output_weight is None:
            raise RuntimeError("KVgrad needs the layer's output projection.")
        bsz, n_kv, _, _ = view.keys.shape
        group = view.group_size
        queries = view.queries(rotated=True).float()  # (B, H, q, D)
        keys = view.keys[:, :, :n_context].float()  # (B, Hkv, T, D)
        values = view.values[:, :, :n_context].float()  # (B, Hkv, T, D)
        weight = view.output_weight.float().to(values.device)  # (H, D, hidden)
        grads = grads.float().to(values.device)  # (B, H, q)
        best = torch.zeros(bsz, view.n_heads, n_context, device=values.device)  # (B, H, T)
        for h in range(view.n_heads):
            kv = h // group
            moved = (values[:, kv] @ weight[h]).norm(dim=-1) if self.use_value else 1.0  # (B, T) ‖v_c W_O^h‖
            for start in range(0, queries.shape[2], self.block_size):
                stop = start + self.block_size
                if lse is not None:  # exact weights from the model's own log-sum-exp
                    logits = queries[:, h, start:stop] @ keys[:, kv].transpose(-1, -2) * view.scaling
                    probs = (logits - lse[:, h, start:stop, None].float()).exp()  # (B, b, T)
                else:
                    block = queries[:, h : h + 1, start:stop]
                    probs = attention_probs(view, block, view.query_positions[start:stop])[:, 0, 0]
                    probs = probs[..., :n_context]  # (B, b, T)
                weighted = probs * grads[:, h, start:stop, None] if self.use_gradient else probs  # (B, b, T)
                best[:, h] = torch.maximum(best[:, h], weighted.amax(dim=1) * moved)
        scores = best.view(bsz, n_kv, group, n_context).amax(dim=2)  # (B, Hkv, T)
        sinks = view.key_positions[..., :n_context].to(scores.device) < self.n_sink
        return scores.masked_fill(sinks, torch.inf)

    def score(self, view: LayerView) -> torch.Tensor:
        raise RuntimeError("KVgrad scores only by reconstruction (the planner runs it that way).")
