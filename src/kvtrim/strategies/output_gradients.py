"""The gradient a reconstruction forward's log-likelihood sends to each head's attention output —
what KVgrad weighs attention by (input × gradient attribution).

One extra forward and backward per reconstruction input, with autograd on (kvtrim's compression
otherwise runs under inference mode): the input embeddings are the leaf, so every attention
output a_p^h (the o_proj input, head h's slice, at position p) gets its true gradient
∂Φ/∂a_p^h, Φ the log-likelihood of the tokens the model must reproduce. The cache is used as it
is and put back afterwards (zero-copy snapshot), so nothing of this pass stays in it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvtrim.cache.snapshot import CacheSnapshot
from kvtrim.core.errors import KVTrimError
from kvtrim.models.adapters import attention_modules, model_device


def output_gradient_norms(
    model: nn.Module, cache: Any, ids: list[int], positions: torch.Tensor, n_targets: int
) -> dict[int, torch.Tensor]:
    """Per layer, ‖∂Φ/∂a_p^h‖ as (1, H, q) for the q tokens of ``ids`` fed at ``positions`` (1, q)
    after ``cache``; Φ = Σ log p(token) over the last ``n_targets`` tokens of ``ids``."""
    modules = attention_modules(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx, attn in enumerate(modules):
        proj = getattr(attn, "o_proj", None)
        if proj is None:
            raise KVTrimError(f"KVgrad needs each attention's o_proj; {type(attn).__name__} has none.")

        def keep(_module: nn.Module, args: tuple, idx: int = idx) -> None:
            args[0].retain_grad()
            captured[idx] = args[0]  # (1, q, H·D)

        handles.append(proj.register_forward_pre_hook(keep))
    snapshot = CacheSnapshot.take(cache)
    device = model_device(model)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            tokens = torch.tensor([ids], device=device)  # (1, q)
            embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)  # (1, q, hidden)
            out = model(
                inputs_embeds=embeds,
                position_ids=positions.to(device),
                cache=cache,
                use_cache=True,
                logits_to_keep=n_targets + 1,
            )
            logits = out.logits[0, :-1].float()  # (n_targets, V): each predicts the next token
            targets = tokens[0, -n_targets:]  # (n_targets,)
            phi = logits.log_softmax(-1).gather(1, targets[:, None]).sum()
            phi.backward()
    finally:
        for handle in handles:
            handle.remove()
        snapshot.restore(cache)
    norms = {}
    for idx, attn in enumerate(modules):
        grad = captured[idx].grad  # (1, q, H·D)
        heads = attn.config.num_attention_heads
        norms[idx] = grad.view(*grad.shape[:2], heads, -1).norm(dim=-1).transpose(1, 2).detach()  # (1, H, q)
    return norms
