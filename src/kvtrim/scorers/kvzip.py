"""KVzip (arXiv 2505.23416): keep what the model needs to reconstruct the context.

Query-agnostic by construction: after the context is prefilled, the model is asked to repeat it
("Repeat the previous context exactly." followed by the context itself, teacher-forced, in chunks
for long contexts). A pair the model attends to while reproducing the context holds information
some future question may need too. Score of a cached pair = the largest attention it receives
from any reconstruction query, over the query heads of its GQA group and over all chunks; the
first ``n_sink`` positions (attention sinks, usually the template's opening) are always kept.

The reconstruction queries see the whole cache — every context pair, then the reconstruction
tokens causally — and the softmax runs over all of it, exactly the attention the model computes.
(NVIDIA kvpress restricts each chunk's softmax to the sinks, the chunk's own context span and the
reconstruction tokens, a cheaper approximation; the scores here follow the paper's definition.)
Later chunks restate the last ``overlap`` tokens of the previous chunk after a "continue" prompt,
as the reference implementation does, so each chunk starts from a known point.

The scoring forwards are driven by :mod:`kvtrim.strategies.reconstruction`; this scorer only
builds the reconstruction inputs and scores one layer of one reconstruction forward, from the
log-sum-exp the model's attention kept (no softmax recomputed) or, without it, by recomputing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtrim.core.errors import KVTrimError
from kvtrim.models.prompting import PromptLayout, encode
from kvtrim.scorers.attention import attention_probs
from kvtrim.scorers.base import LayerView, Scorer


@dataclass
class KVzip(Scorer):
    """Max attention each pair receives while the model repeats the context (needs ~2× prefill)."""

    name = "kvzip"
    summary = "Max attention each pair gets while the model repeats the context (≈2× prefill cost)."
    paper = "arXiv 2505.23416"
    needs_reconstruction: ClassVar[bool] = True
    #: context tokens reconstructed per forward (long contexts are repeated in chunks)
    chunk_tokens: int = 2048
    #: tokens of the previous chunk restated at the start of the next one
    overlap: int = 8
    n_sink: int = 4
    #: reconstruction queries scored at once, against ``key_block`` context keys: memory grows as
    #: H · block_size · key_block, never T², and the block of logits stays in the CPU's cache
    block_size: int = 256
    key_block: int = 512
    prompt: str = "Repeat the previous context exactly."
    continue_prompt: str = "Repeat the part of the previous context exactly, starting with"

    def __post_init__(self) -> None:
        for option in ("chunk_tokens", "block_size", "key_block"):
            if getattr(self, option) < 1:
                raise KVTrimError(
                    f"{option} must be a positive number of tokens, got {getattr(self, option)}."
                )
        for option in ("overlap", "n_sink"):
            if getattr(self, option) < 0:
                raise KVTrimError(f"{option} must be >= 0, got {getattr(self, option)}.")

    def reconstruction_inputs(
        self, tokenizer: Any, layout: PromptLayout, context: str, max_tokens: int
    ) -> list[list[int]]:
        """Token ids of each reconstruction forward: prompt, the template's answer opening, chunk.

        ``max_tokens`` is the room left in the model's window after the context; chunks shrink
        to fit it.
        """
        return [ids for ids, _ in self.reconstruction_chunks(tokenizer, layout, context, max_tokens)]

    def reconstruction_chunks(
        self, tokenizer: Any, layout: PromptLayout, context: str, max_tokens: int
    ) -> list[tuple[list[int], int]]:
        """Each reconstruction forward's ids and how many of its last tokens are context to repeat."""
        ids = encode(tokenizer, context)
        first = encode(tokenizer, layout.question_prefix + self.prompt)
        later = encode(tokenizer, layout.question_prefix + self.continue_prompt)
        suffix = encode(tokenizer, layout.question_suffix)
        overhead = max(len(first), len(later) + self.overlap) + len(suffix)
        size = min(self.chunk_tokens, max_tokens - overhead)
        if size < 1:
            raise KVTrimError(
                f"kvzip needs room after the context to repeat it: {max_tokens} tokens are left in the "
                "model's window, too few; shorten the context or use another method."
            )
        chunks = [ids[start : start + size] for start in range(0, len(ids), size)]
        inputs = [(first + suffix + chunks[0], len(chunks[0]))]
        for previous, chunk in zip(chunks, chunks[1:], strict=False):
            restated = previous[-self.overlap :] if self.overlap else []
            inputs.append((later + restated + suffix + chunk, len(chunk)))
        return inputs

    def score_reconstruction(self, view: LayerView, lse: torch.Tensor | None, n_context: int) -> torch.Tensor:
        """Max attention from this forward's queries to each context pair: (B, Hkv, n_context).

        With the model's log-sum-exp the weights are exp(s·q·k − lse) exactly, so only the context
        columns are computed and no softmax is run: one product of a tile of keys with a block of
        queries, keys along the rows so that the max runs along contiguous memory, minus each
        query's lse, then a max (and one exp per pair at the end). Tiling the keys too keeps each
        product's logits (``key_block`` × G·``block_size``) in cache while they are reduced: 1.2-1.5×
        faster than whole key columns on CPU, with the same values.
        """
        if lse is None:
            return super().score_reconstruction(view, lse, n_context)
        bsz, n_kv, _, dim = view.keys.shape
        queries = view.queries(rotated=True).float() * view.scaling  # (B, H, q, D)
        q_len = queries.shape[2]
        rows = queries.reshape(bsz, n_kv, -1, dim).transpose(-1, -2)  # (B, Hkv, D, G·q), column g·q + t
        offsets = lse.float().reshape(bsz, n_kv, 1, -1)  # (B, Hkv, 1, G·q)
        keys = view.keys[:, :, :n_context].float()  # (B, Hkv, T, D)
        best = keys.new_full(keys.shape[:3], -torch.inf)  # (B, Hkv, T)
        step = self.block_size * (rows.shape[-1] // q_len)  # block_size queries of each of the G heads
        for start in range(0, rows.shape[-1], step):
            block, block_offsets = rows[..., start : start + step], offsets[..., start : start + step]
            for first in range(0, n_context, self.key_block):
                tile = best[..., first : first + self.key_block]  # (B, Hkv, k) view
                logits = keys[:, :, first : first + self.key_block] @ block  # (B, Hkv, k, b): s·q·k
                torch.maximum(tile, logits.sub_(block_offsets).amax(dim=-1), out=tile)  # s·q·k − lse
        best = best.exp_()  # (B, Hkv, T)
        sinks = view.key_positions[..., :n_context].to(best.device) < self.n_sink  # (T,) or (B, Hkv, T)
        return best.masked_fill(sinks, torch.inf)

    def score(self, view: LayerView) -> torch.Tensor:
        """Max attention from this forward's queries (B, H, q, D) to every key: (B, Hkv, T)."""
        bsz, n_kv, seq, _ = view.keys.shape
        queries = view.queries(rotated=True)  # (B, H, q, D)
        query_pos = view.query_positions.to(queries.device)  # (q,)
        best = torch.zeros(bsz, n_kv, seq, device=queries.device)  # (B, Hkv, T)
        for start in range(0, queries.shape[2], self.block_size):
            stop = start + self.block_size
            probs = attention_probs(
                view, queries[:, :, start:stop], query_pos[start:stop]
            )  # (B, Hkv, G, b, T)
            best = torch.maximum(best, probs.amax(dim=(2, 3)))
        sinks = view.key_positions.to(best.device) < self.n_sink  # (T,) or (B, Hkv, T)
        return best.masked_fill(sinks, torch.inf)
