"""Attention over a part of the keys, with the log-sum-exp that lets parts be merged exactly.

A ragged layer's pairs live in two places (the kept pairs packed per head, and the tokens added
since, dense); attending to each on its own and merging by log-sum-exp gives the attention over
their union without ever concatenating them (what flash-decoding does across splits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Partial(NamedTuple):
    """Attention over some keys: output (B, H, q, Dv) and log-sum-exp of the scaled scores (B, H, q)."""

    out: torch.Tensor
    lse: torch.Tensor


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,
    causal: bool = False,
) -> Partial:
    """query (B, H, q, Dk), keys (B, Hkv, T, Dk), values (B, Hkv, T, Dv), Hkv dividing H (GQA);
    ``visible``: booleans (q, T) or (B, 1, q, T), or None (all visible); ``causal``: query t sees
    keys ≤ t (q = T, no ``visible``). T must be > 0.

    On CPU, when keys and values share their width, torch's own flash kernel (what ``sdpa`` runs
    there, with its log-sum-exp); elsewhere the scores are written out.
    """
    if (
        query.device.type == "cpu"
        and keys.shape[-1] == values.shape[-1]
        and query.shape[-1] == keys.shape[-1]
    ):
        mask = None
        if visible is not None:
            mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~visible, -torch.inf
            )
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, is_causal=causal, attn_mask=mask, scale=scale
        )
        return Partial(out, lse)
    if causal:
        visible = torch.ones(query.shape[2], keys.shape[2], dtype=torch.bool, device=query.device).tril()
    return attend_written_out(query, keys, values, scale, visible)


def attend_written_out(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,
    block: int = 256,
) -> Partial:
    """:func:`attend` with the scores materialised (any device, any key width), in float32, for
    ``block`` queries at a time: memory H · block · T, never H · q · T."""
    outs, lses = [], []
    for start in range(0, query.shape[2], block):
        rows = None if visible is None else visible[..., start : start + block, :]
        part = _written_out_block(query[:, :, start : start + block], keys, values, scale, rows)
        outs.append(part.out)
        lses.append(part.lse)
    if len(outs) == 1:
        return Partial(outs[0], lses[0])
    return Partial(torch.cat(outs, dim=2), torch.cat(lses, dim=2))


def _written_out_block(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, visible: torch.Tensor | None
) -> Partial:
    batch, n_heads, q_len, _ = query.shape
    n_kv = keys.shape[1]
    grouped = query.reshape(batch, n_kv, (n_heads // n_kv) * q_len, -1).float()  # row g·q + t
    scores = grouped @ keys.float().transpose(-1, -2) * scale  # (B, Hkv, G·q, T)
    if visible is not None:
        lead = [1] * (visible.dim() - 2)
        hidden = ~visible.repeat(*lead, n_heads // n_kv, 1)  # (G·q, T) or (B, 1, G·q, T)
        scores = scores.masked_fill(hidden, -torch.inf)
    lse = scores.logsumexp(dim=-1)  # (B, Hkv, G·q)
    out = torch.softmax(scores, dim=-1) @ values.float()  # (B, Hkv, G·q, Dv)
    return Partial(
        out.reshape(batch, n_heads, q_len, -1).to(values.dtype), lse.reshape(batch, n_heads, q_len)
    )


def merge(first: Partial, second: Partial) -> torch.Tensor:
    """Attention over the union of two disjoint key sets: each output weighted by its share of
    the softmax mass, exp(lse) / (exp(lse₁) + exp(lse₂)). Returns (B, H, q, Dv)."""
    share = torch.sigmoid(first.lse - second.lse)[..., None]  # (B, H, q, 1), the first part's
    return torch.lerp(second.out.float(), first.out.float(), share).to(second.out.dtype)
