"""Per-model statistics computed locally and cached on disk (never downloaded).

Q-Filters: run the model over local text, collect post-RoPE queries of every layer and head,
keep a random sample, take the first right singular vector per query head (oriented so most
queries project positively on it), average the filters of the heads sharing a KV head. The result,
(layers, kv-heads, head_dim), is saved as safetensors under the user cache dir, keyed by a
fingerprint of the model's weights, so each model is calibrated once.

Query statistics (for ``expected-attention-calibrated``): the mean and covariance of every
(layer, query head)'s pre-RoPE queries over the same kind of local text, (L, H, D) and
(L, H, D, D), cached the same way. They describe "a typical future query" independently of the
context being compressed, which matters when the context's own queries are few or unrepresentative
of the questions that will follow.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from kvtrim.errors import KVTrimError
from kvtrim.models import (
    attention_modules,
    cache_dir,
    queries_from_projection,
    query_projection,
    rope_function,
    text_config,
)

QFILTERS_VERSION = 1
QUERY_STATS_VERSION = 1
DUO_VERSION = 1
DUO_NEEDLE = " The special magic number is {value}. Remember it: the magic number is {value}. "
DUO_QUESTION = "\nWhat is the special magic number mentioned above? The special magic number is"
DUO_VALUES = ("7294031", "4186502", "9051736", "2637418")


def model_fingerprint(model: nn.Module) -> str:
    """A short id of the model's architecture and weights (two models never share calibration)."""
    cfg = text_config(model)
    digest = hashlib.sha1()
    digest.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    first_proj, _ = query_projection(attention_modules(model)[0])
    digest.update(first_proj.weight.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    name = Path(str(getattr(cfg, "_name_or_path", "") or cfg.model_type)).name.replace(" ", "_")
    return f"{name[:60]}-{digest.hexdigest()[:12]}"


def bundled_texts() -> list[str]:
    """The redistributable prose shipped with kvtrim (default calibration corpus)."""
    data = resources.files("kvtrim") / "data"
    return [(data / name).read_text(encoding="utf-8") for name in ("essays.txt", "example.md")]


def qfilters_path(model: nn.Module) -> Path:
    return cache_dir() / "calibration" / model_fingerprint(model) / "qfilters.safetensors"


def load_or_compute_qfilters(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> torch.Tensor:
    """Filters (L, Hkv, D) from the disk cache, computing and saving them first if absent."""
    stored = _load_or_compute(
        qfilters_path(model),
        QFILTERS_VERSION,
        "Q-Filters",
        "kvtrim calibrate",
        lambda corpus: {"filters": compute_qfilters(model, tokenizer, corpus, **kwargs)},
        tokenizer,
        texts,
        refresh,
    )
    return stored["filters"]


def _load_or_compute(
    path: Path,
    version: int,
    what: str,
    command: str,
    compute: Callable[[list[str]], dict[str, torch.Tensor]],
    tokenizer: Any,
    texts: list[str] | None,
    refresh: bool,
) -> dict[str, torch.Tensor]:
    """The tensors saved at ``path`` by this ``version`` of a calibration; otherwise computed from
    ``texts`` (the bundled prose by default), saved, and returned. Given texts are never cached
    over the default corpus's file, so they are always computed."""
    stored = None if refresh or texts is not None else _load_versioned(path, version)
    if stored is not None:
        return stored
    if tokenizer is None:
        raise KVTrimError(f"{what} need calibration for this model: pass the tokenizer (or run `{command}`).")
    print(f"kvtrim: calibrating {what} for this model (once; cached in {path.parent})", file=sys.stderr)
    tensors = compute(texts or bundled_texts())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"version": str(version)})
    return tensors


def calibration_sequences(
    model: nn.Module, tokenizer: Any, texts: list[str], n_sequences: int, seq_len: int
) -> list[list[int]]:
    """Consecutive, non-overlapping token windows of ``texts`` (at most ``n_sequences``), each
    ``seq_len`` tokens long or shorter when the text or the model's window is shorter."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 64:
        raise KVTrimError("Calibration text is too short (need at least 64 tokens).")
    seq_len = min(seq_len, len(ids), int(getattr(text_config(model), "max_position_embeddings", seq_len)))
    starts = list(range(0, len(ids) - seq_len + 1, seq_len))[:n_sequences]
    return [ids[start : start + seq_len] for start in starts]


def orient_filter(direction: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Flip ``direction`` (D,) so that most ``queries`` (N, D) project positively on it."""
    positive = (queries @ direction > 0).float().mean()
    return direction if positive >= 0.5 else -direction


def dominant_direction(queries: torch.Tensor) -> torch.Tensor:
    """First right singular vector of ``queries`` (N, D), oriented like most queries: (D,)."""
    direction = torch.linalg.svd(queries.float(), full_matrices=False).Vh[0]
    return orient_filter(direction, queries.float())


@torch.inference_mode()
def compute_qfilters(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int = 20,
    seq_len: int = 2048,
    n_samples: int = 3000,
    seed: int = 0,
) -> torch.Tensor:
    """Compute Q-Filters from ``texts``: returns (L, Hkv, D) float32 on CPU."""
    sequences = calibration_sequences(model, tokenizer, texts, n_sequences, seq_len)
    attentions = attention_modules(model)
    per_seq = max(1, n_samples // len(sequences))
    gen = torch.Generator().manual_seed(seed)
    collected: list[list[torch.Tensor]] = [[] for _ in attentions]
    projected: dict[int, torch.Tensor] = {}
    handles = []

    def stash(idx: int):
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            projected[idx] = out

        return hook

    def collect(idx: int, attn: nn.Module):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            q = queries_from_projection(attn, projected.pop(idx))  # (1, H, T, D)
            cos, sin = kwargs["position_embeddings"]
            q = rope_function(attn)(q, q, cos, sin)[0][0]  # (H, T, D) post-RoPE
            pick = torch.randperm(q.shape[1], generator=gen)[:per_seq].to(q.device)
            collected[idx].append(q[:, pick].float().cpu())

        return hook

    device = next(model.parameters()).device
    try:
        for idx, attn in enumerate(attentions):
            proj, _ = query_projection(attn)
            handles.append(proj.register_forward_hook(stash(idx)))
            handles.append(attn.register_forward_hook(collect(idx, attn), with_kwargs=True))
        for seq in tqdm(sequences, desc="calibrating Q-Filters", unit="seq", file=sys.stderr):
            model(input_ids=torch.tensor([seq], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    filters = []
    for chunks in collected:
        queries = torch.cat(chunks, dim=1)  # (H, N, D)
        per_head = torch.stack([dominant_direction(head) for head in queries])  # (H, D)
        n_kv = text_config(model).num_key_value_heads
        filters.append(per_head.view(n_kv, -1, per_head.shape[-1]).mean(dim=1))  # (Hkv, D)
    return torch.stack(filters)  # (L, Hkv, D)


def _load_versioned(path: Path, version: int) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` if it exists and was written by ``version`` of its computation."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("version") != str(version):
            return None
    return load_file(str(path))


def query_stats_path(model: nn.Module) -> Path:
    return cache_dir() / "calibration" / model_fingerprint(model) / "query_stats.safetensors"


def load_or_compute_query_stats(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (L, H, D), covariance (L, H, D, D)) from the disk cache, computed and saved first if
    absent or written by another version of the computation."""

    def compute(corpus: list[str]) -> dict[str, torch.Tensor]:
        mean, cov = compute_query_stats(model, tokenizer, corpus, **kwargs)
        return {"mean": mean, "cov": cov}

    stored = _load_or_compute(
        query_stats_path(model),
        QUERY_STATS_VERSION,
        "Query statistics",
        "kvtrim calibrate --what query-stats",
        compute,
        tokenizer,
        texts,
        refresh,
    )
    return stored["mean"], stored["cov"]


@torch.inference_mode()
def compute_query_stats(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    n_sequences: int = 20,
    seq_len: int = 2048,
    skip_first: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (L, H, D) and population covariance (L, H, D, D) of the pre-RoPE queries (q-norm
    applied) of every layer and query head over ``texts``, float32 on CPU.

    The first ``skip_first`` positions of each sequence are left out, as expected-attention leaves
    out the queries of its sink positions: they are outliers no later query resembles. Sums are
    accumulated in float64 so that E[qqᵀ] − μμᵀ does not cancel badly.
    """
    sequences = calibration_sequences(model, tokenizer, texts, n_sequences, seq_len)
    if all(len(seq) <= skip_first for seq in sequences):
        raise KVTrimError("Calibration sequences are too short for query statistics.")
    attentions = attention_modules(model)
    sums: list[torch.Tensor | None] = [None] * len(attentions)  # (H, D) each
    squares: list[torch.Tensor | None] = [None] * len(attentions)  # (H, D, D) each
    count = 0
    handles = []

    def collect(idx: int, attn: nn.Module):
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            q = queries_from_projection(attn, out)[0, :, skip_first:].double().cpu()  # (H, N, D)
            total, outer = q.sum(dim=1), q.transpose(-1, -2) @ q  # (H, D), (H, D, D)
            sums[idx] = total if sums[idx] is None else sums[idx] + total
            squares[idx] = outer if squares[idx] is None else squares[idx] + outer

        return hook

    device = next(model.parameters()).device
    try:
        for idx, attn in enumerate(attentions):
            proj, _ = query_projection(attn)
            handles.append(proj.register_forward_hook(collect(idx, attn)))
        for seq in tqdm(sequences, desc="calibrating query statistics", unit="seq", file=sys.stderr):
            model(input_ids=torch.tensor([seq], device=device), use_cache=False)
            count += max(0, len(seq) - skip_first)
    finally:
        for handle in handles:
            handle.remove()
    means, covs = [], []
    for total, outer in zip(sums, squares, strict=True):
        mean = total / count  # (H, D)
        means.append(mean)
        covs.append(outer / count - mean[:, :, None] * mean[:, None, :])  # E[qqᵀ] − μμᵀ, (H, D, D)
    return torch.stack(means).float(), torch.stack(covs).float()


def duo_heads_path(model: nn.Module) -> Path:
    return cache_dir() / "calibration" / model_fingerprint(model) / "duo_heads.safetensors"


def load_or_compute_duo_heads(
    model: nn.Module, tokenizer: Any, texts: list[str] | None = None, refresh: bool = False, **kwargs: Any
) -> torch.Tensor:
    """Retrieval scores (L, Hkv) from the disk cache, computed and saved first if absent or stale."""
    stored = _load_or_compute(
        duo_heads_path(model),
        DUO_VERSION,
        "Duo head splits",
        "kvtrim calibrate --what duo-heads",
        lambda corpus: {"retrieval": compute_duo_heads(model, tokenizer, corpus, **kwargs)},
        tokenizer,
        texts,
        refresh,
    )
    return stored["retrieval"]


def passkey_prompt(
    haystack: list[int],
    needle: list[int],
    question: list[int],
    seq_len: int,
    sinks: int,
    window: int,
    depth: float,
) -> tuple[list[int], int]:
    """``seq_len`` ids: haystack with ``needle`` at ``depth`` of the span between the sinks and the
    recent window, then ``question``. Returns the ids and where the needle starts."""
    context_len = seq_len - len(question)
    room = context_len - window - sinks - len(needle)
    if room < 0 or len(haystack) < context_len:
        raise KVTrimError("Calibration text is too short for the passkey calibration.")
    start = sinks + round(depth * room)
    ids = haystack[:start] + needle + haystack[start : context_len - len(needle)] + question
    return ids, start


@torch.inference_mode()
def compute_duo_heads(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    seq_len: int = 2048,
    sinks: int = 64,
    window: int = 256,
    depths: tuple[float, ...] = (0.1, 0.4, 0.7, 1.0),
) -> torch.Tensor:
    """Retrieval score in [0, 1] of every (layer, kv-head): needle / (needle + sinks + recent)
    attention mass of the question's queries, summed over its query heads, its queries and one
    passkey text per depth. Sliding-window layers are never compressed and score 0.

    ``seq_len`` is clipped to the text and the model's window; ``sinks`` and ``window`` to 1/16 and
    1/4 of the context, so that short calibration texts still leave the needle outside both.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    haystack: list[int] = []
    for text in texts:
        haystack.extend(encode(text))
    question = encode(DUO_QUESTION)
    seq_len = min(
        seq_len,
        len(haystack) + len(question),
        int(getattr(text_config(model), "max_position_embeddings", seq_len)),
    )
    context_len = seq_len - len(question)
    sinks, window = min(sinks, context_len // 16), min(window, context_len // 4)
    attentions = attention_modules(model)
    n_kv = text_config(model).num_key_value_heads
    needle_mass = torch.zeros(len(attentions), n_kv, dtype=torch.float64)  # (L, Hkv)
    local_mass = torch.zeros_like(needle_mass)
    projected: dict[int, torch.Tensor] = {}
    span: dict[str, int] = {}

    def stash(idx: int):
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            projected[idx] = out

        return hook

    def measure(idx: int, attn: nn.Module):
        def hook(_m: nn.Module, _args: tuple, kwargs: dict, _out: Any) -> None:
            q = queries_from_projection(attn, projected.pop(idx))  # (1, H, T, D)
            layer = kwargs.get("cache", kwargs.get("past_key_values")).layers[idx]
            if getattr(layer, "is_sliding", False):
                return
            cos, sin = kwargs["position_embeddings"]
            q = rope_function(attn)(q, q, cos, sin)[0][0, :, -len(question) :].float()  # (H, Q, D)
            keys = layer.keys[0].float()  # (Hkv, T, D), post-RoPE
            seq, n_q, group = keys.shape[1], q.shape[1], q.shape[0] // keys.shape[0]
            keys = keys.repeat_interleave(group, dim=0)  # (H, T, D)
            logits = attn.scaling * q @ keys.transpose(-1, -2)  # (H, Q, T)
            rows = torch.arange(seq - n_q, seq, device=q.device)[:, None]  # (Q, 1) query positions
            cols = torch.arange(seq, device=q.device)[None]  # (1, T)
            probs = torch.softmax(logits.masked_fill(cols > rows, -torch.inf), dim=-1)  # (H, Q, T)
            needle = (cols >= span["start"]) & (cols < span["end"])  # (1, T)
            local = (cols < sinks) | (cols > rows - window)  # (Q, T): sinks + each query's recent window
            per_head_needle = (probs * needle).sum(dim=(1, 2)).double().cpu()  # (H,)
            per_head_local = (probs * local).sum(dim=(1, 2)).double().cpu()  # (H,)
            needle_mass[idx] += per_head_needle.view(-1, group).sum(dim=1)  # (Hkv,)
            local_mass[idx] += per_head_local.view(-1, group).sum(dim=1)

        return hook

    from transformers import DynamicCache

    device = next(model.parameters()).device
    handles = []
    try:
        for idx, attn in enumerate(attentions):
            proj, _ = query_projection(attn)
            handles.append(proj.register_forward_hook(stash(idx)))
            handles.append(attn.register_forward_hook(measure(idx, attn), with_kwargs=True))
        for i, depth in enumerate(
            tqdm(depths, desc="calibrating the head split", unit="text", file=sys.stderr)
        ):
            needle = encode(DUO_NEEDLE.format(value=DUO_VALUES[i % len(DUO_VALUES)]))
            ids, start = passkey_prompt(haystack, needle, question, seq_len, sinks, window, depth)
            span.update(start=start, end=start + len(needle))
            model(
                input_ids=torch.tensor([ids], device=device),
                cache=DynamicCache(config=text_config(model)),
                use_cache=True,
                logits_to_keep=1,
            )
    finally:
        for handle in handles:
            handle.remove()
        projected.clear()
    return (needle_mass / (needle_mass + local_mass).clamp_min(1e-12)).float()  # (L, Hkv)
