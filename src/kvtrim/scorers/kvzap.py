"""KVzap (arXiv 2601.07891): KVzip's scores, predicted from each layer's input for one matmul.

KVzip (:mod:`kvtrim.scorers.kvzip`) is among the strongest scorers but costs several extra
forwards per context. KVzap fits, once per model and on local text, a linear map per layer from
the attention's input hidden states to the log of KVzip's score of each KV head
(:mod:`kvtrim.calibration.surrogates`); scoring is then (B, T, F) @ (F, Hkv) in the prefill. The
fit is cached like every calibration and made on first use (``kvtrim calibrate --what kvzap``
makes it ahead, and reports its held-out rank correlation with KVzip). Like KVzip, the first
``n_sink`` pairs are always kept (they are left out of the fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtrim.calibration.surrogates import load_or_fit_kvzap, predict_linear
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import read_text
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class KVzap(Scorer):
    """Score = [h, 1] · W_layer: KVzip's log-score predicted from the layer's input hidden state."""

    name = "kvzap"
    summary = "KVzip's scores predicted from hidden states by a linear map fitted locally (one matmul)."
    paper = "arXiv 2601.07891"
    calibration_text: str | None = None
    n_sink: int = 4
    weights: torch.Tensor | None = field(default=None, repr=False)  # (L, F + 1, Hkv)

    def setup(self, model: torch.nn.Module, tokenizer: object) -> None:
        if self.weights is None:
            texts = [read_text(self.calibration_text, "Calibration text")] if self.calibration_text else None
            self.weights = load_or_fit_kvzap(model, tokenizer, texts=texts)["weights"]

    def score(self, view: LayerView) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("KVzap.setup() must run before scoring (the engine does it).")
        hidden = view.hidden_states  # (B, Tq, F)
        if hidden is None or hidden.shape[1] != view.keys.shape[-2]:
            raise KVTrimError(
                "KVzap scores the pairs of a one-shot prefill from their hidden states "
                "(no chunked prefill, no eviction while decoding)."
            )
        weights = self.weights[view.layer_idx].to(hidden.device)  # (F + 1, Hkv)
        scores = predict_linear(weights, hidden.float()).transpose(1, 2).contiguous()  # (B, Hkv, T)
        scores[..., : self.n_sink] = torch.inf
        return scores
