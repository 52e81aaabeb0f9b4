"""Q-Filters (arXiv 2503.02812), computed locally: the dominant direction of each head's queries.

Run the model over local text, collect post-RoPE queries of every layer and head, keep a random
sample, take the first right singular vector per query head (oriented so most queries project
positively on it), average the filters of the heads sharing a KV head: (layers, kv-heads, D).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvtrim.calibration.corpus import calibration_sequences
from kvtrim.core.hooks import attention_hooks
from kvtrim.models.adapters import hooked_layers, queries_from_projection, rope_function, text_config
from kvtrim.models.forward import forward


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
    layers = hooked_layers(model)
    per_seq = max(1, n_samples // len(sequences))
    gen = torch.Generator().manual_seed(seed)
    collected: list[list[torch.Tensor]] = [[] for _ in layers]

    def collect(idx: int, attn: nn.Module, kwargs: dict, projected: torch.Tensor | None) -> None:
        q = queries_from_projection(attn, projected)  # (1, H, T, D)
        cos, sin = kwargs["position_embeddings"]
        q = rope_function(attn)(q, q, cos, sin)[0][0]  # (H, T, D) post-RoPE
        pick = torch.randperm(q.shape[1], generator=gen)[:per_seq].to(q.device)
        collected[idx].append(q[:, pick].float().cpu())

    with attention_hooks(layers, on_attention=collect):
        for seq in tqdm(sequences, desc="calibrating Q-Filters", unit="seq", file=sys.stderr):
            forward(model, [seq])
    n_kv = text_config(model).num_key_value_heads
    filters = []
    for chunks in collected:
        queries = torch.cat(chunks, dim=1)  # (H, N, D)
        per_head = torch.stack([dominant_direction(head) for head in queries])  # (H, D)
        filters.append(per_head.view(n_kv, -1, per_head.shape[-1]).mean(dim=1))  # (Hkv, D)
    return torch.stack(filters)  # (L, Hkv, D)
