"""Fast KVzip (arXiv 2601.17668): KVzip's scores from a small gate on each layer's input.

A gate per layer — a low-rank sink attention over the attention's input hidden states, trained
once per model on local text against kvtrim's own ``kvzip`` scores
(:mod:`kvtrim.calibration.gates`; ``kvtrim calibrate --what fastkvzip`` trains it ahead and
reports its held-out rank correlation) — gives every pair a share g ∈ (0, 1) of what KVzip would
give it. Scoring is one (T, F) @ (F, Hkv·r) product per layer. As in the paper, the most recent
``window`` pairs are always kept, and so are the first ``n_sink`` (the gates never saw them:
KVzip keeps them unconditionally).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtrim.calibration.gates import gate_log, layer_gate, load_or_fit_fastkvzip
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import read_text
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class FastKVzip(Scorer):
    """Score = g(h): the gate's share for the pair, from the layer's input hidden state."""

    name = "fastkvzip"
    summary = "KVzip's scores from a low-rank sink-attention gate per layer, trained locally."
    paper = "arXiv 2601.17668"
    calibration_text: str | None = None
    n_sink: int = 4
    window: int = 128
    gates: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.window < 0:
            raise KVTrimError(f"n_sink and window must be >= 0, got {self.n_sink} and {self.window}.")

    def setup(self, model: torch.nn.Module, tokenizer: object) -> None:
        if self.gates is None:
            texts = [read_text(self.calibration_text, "Calibration text")] if self.calibration_text else None
            self.gates = load_or_fit_fastkvzip(model, tokenizer, texts=texts)

    def score(self, view: LayerView) -> torch.Tensor:
        if self.gates is None:
            raise RuntimeError("FastKVzip.setup() must run before scoring (the engine does it).")
        hidden = view.hidden_states  # (B, Tq, F)
        if hidden is None or hidden.shape[1] != view.keys.shape[-2]:
            raise KVTrimError(
                "Fast KVzip scores the pairs of a one-shot prefill from their hidden states "
                "(no chunked prefill, no eviction while decoding)."
            )
        gate = {k: v.to(hidden.device) for k, v in layer_gate(self.gates, view.layer_idx).items()}
        scores = gate_log(gate, hidden.float()).exp().transpose(1, 2).contiguous()  # (B, Hkv, T)
        scores[..., : self.n_sink] = torch.inf
        if self.window:
            scores[..., -self.window :] = torch.inf
        return scores
