"""Expected Attention (arXiv 2510.00636): how much will *future* queries attend to each key?

Future queries are modelled as q ~ N(μ̄, Σ̄): the mean and covariance of the context's pre-RoPE
queries, rotated by the RoPE matrix averaged over the next ``n_future_positions`` positions. For
a Gaussian, E[exp(s·qᵀk)] = exp(s·μ̄ᵀk + s²·kᵀΣ̄k/2) (s = the layer's softmax scaling, 1/√D for most
models), so the expected attention is a softmax over keys of that exponent, computed in closed
form with no attention matrix.

``stats="calibrated"`` (the ``expected-attention-calibrated`` method) takes μ and Σ from
statistics of the model's queries over local text, computed once per model and cached
(:func:`kvtrim.calibration.load_or_compute_query_stats`), instead of from the context's own
queries: a context's queries describe *reading* it, while the future queries are the question's and
the answer's; calibrated statistics are also available for short contexts whose few queries give a
poor covariance estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtrim.calibration import load_or_compute_query_stats
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import read_text
from kvtrim.scorers.base import LayerView, Scorer

STATS_SOURCES = ("context", "calibrated")


def query_statistics(queries: torch.Tensor, use_covariance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """queries: (B, H, N, D) -> mean (B, H, D), covariance (B, H, D, D) = (q−μ)ᵀ(q−μ)/N or None."""
    q = queries.float()
    mean = q.mean(dim=2)  # (B, H, D)
    if not use_covariance:
        return mean, None
    centred = q - mean[:, :, None]  # (B, H, N, D)
    cov = centred.transpose(-1, -2) @ centred / q.shape[2]  # (B, H, D, D)
    return mean, cov


def expected_logits(
    keys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """log E[exp(s·qᵀk)] for q ~ N(mean, cov), per query head.

    keys: (B, H, T, D) (already repeated per query head); mean: (B, H, D); cov: (B, H, D, D).
    Returns (B, H, T).
    """
    k = keys.float()
    logits = scaling * torch.einsum("bhtd,bhd->bht", k, mean)
    if cov is not None:
        quad = torch.einsum("bhtd,bhtd->bht", k @ cov, k)  # kᵀΣk, (B, H, T)
        logits = logits + 0.5 * scaling**2 * quad
    return logits


@dataclass
class ExpectedAttention(Scorer):
    """Closed-form expected attention of future queries, weighted by value norm."""

    name = "expected-attention"
    summary = "Closed-form attention that future queries (Gaussian, averaged RoPE) will pay each key."
    paper = "arXiv 2510.00636"
    chunkable = True
    n_sink: int = 4
    n_future_positions: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    #: where μ and Σ come from: the context's own queries, or per-model calibrated statistics
    stats: str = "context"
    #: calibration text file for ``stats="calibrated"`` (default: the bundled prose)
    calibration_text: str | None = None
    #: calibrated (mean (L, H, D), covariance (L, H, D, D)); loaded by setup() when None
    query_stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stats not in STATS_SOURCES:
            raise KVTrimError(f"expected-attention stats must be one of {STATS_SOURCES}, got {self.stats!r}.")

    def setup(self, model: torch.nn.Module, tokenizer: object) -> None:
        if self.stats == "calibrated" and self.query_stats is None:
            texts = [read_text(self.calibration_text, "Calibration text")] if self.calibration_text else None
            self.query_stats = load_or_compute_query_stats(model, tokenizer, texts=texts)

    def _statistics(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """μ (B, H, D) and Σ (B, H, D, D) or None, before the future rotation."""
        if self.stats == "calibrated":
            if self.query_stats is None:
                raise RuntimeError("ExpectedAttention.setup() must run before scoring (the engine does it).")
            bsz, device = view.keys.shape[0], view.keys.device
            mean = self.query_stats[0][view.layer_idx].to(device, torch.float32)  # (H, D)
            mean = mean[None].expand(bsz, -1, -1)  # (B, H, D)
            if not self.use_covariance:
                return mean, None
            cov = self.query_stats[1][view.layer_idx].to(device, torch.float32)  # (H, D, D)
            return mean, cov[None].expand(bsz, -1, -1, -1)  # (B, H, D, D)
        queries = view.queries()  # (B, H, Tq, D), pre-RoPE
        # positions increase along the sequence, so the non-sink queries are a suffix: slice, don't copy
        first = int(torch.searchsorted(view.query_positions.cpu(), self.n_sink))
        if queries.shape[2] - first >= 2:
            queries = queries[:, :, first:]
        return query_statistics(queries, self.use_covariance)

    def score(self, view: LayerView) -> torch.Tensor:
        bsz, n_kv, _, _ = view.keys.shape
        mean, cov = self._statistics(view)

        start = int(view.query_positions[-1]) + 1
        future = torch.arange(start, start + self.n_future_positions, device=view.keys.device)
        rot = view.mean_rotation(future)  # (D, D)
        mean = mean @ rot.T  # R̄μ as row vectors, (B, H, D)
        if cov is not None:
            cov = rot @ cov @ rot.T  # R̄ Σ R̄ᵀ, (B, H, D, D)

        keys = view.keys.repeat_interleave(view.group_size, dim=1)  # (B, H, T, D)
        logits = expected_logits(keys, mean, cov, view.scaling)  # (B, H, T)
        is_sink = (view.key_positions < self.n_sink).to(logits.device)  # (T,) or (B, Hkv, T)
        per_query_head = is_sink if is_sink.dim() == 1 else is_sink.repeat_interleave(view.group_size, dim=1)
        logits = logits.masked_fill(per_query_head, -torch.inf)
        probs = torch.softmax(logits, dim=-1)  # (B, H, T)
        scores = probs.view(bsz, n_kv, view.group_size, -1).mean(dim=2)  # (B, Hkv, T)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * view.values.float().norm(dim=-1)
        return scores.masked_fill(is_sink, torch.inf)


@dataclass
class ExpectedAttentionCalibrated(ExpectedAttention):
    """Expected Attention with μ, Σ calibrated once per model on local text (cached on disk)."""

    name = "expected-attention-calibrated"
    summary = "Expected attention with query mean/covariance calibrated per model on local text (cached)."
    paper = "arXiv 2510.00636"
    stats: str = "calibrated"
