"""Per-architecture internals kvtrim needs, found the same way for every supported model: the
attention modules, their query projection and q-norm, the output projection, the model's own
RoPE function and rotary embedding for arbitrary positions, and its window.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvtrim.core.errors import KVTrimError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text", "phi3")


def check_supported(model: nn.Module) -> None:
    """Raise :class:`KVTrimError` unless the model's architecture is one kvtrim knows."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KVTrimError(
            f"Unsupported architecture {model_type!r}. Supported: Llama, Mistral, Qwen2, Qwen3, Gemma3, Phi3."
        )


def text_config(model: nn.Module) -> Any:
    """The decoder config (multimodal wrappers keep it under ``text_config``)."""
    return model.config.get_text_config(decoder=True)


def has_sliding_layers(model: nn.Module) -> bool:
    """Whether some layers attend over a sliding window only (Gemma 3: five layers of six)."""
    layer_types = getattr(text_config(model), "layer_types", None) or []
    return any(kind != "full_attention" for kind in layer_types)


def full_attention_layers(model: nn.Module) -> list[bool] | None:
    """Per layer, whether it attends over the whole context; None when the config does not say."""
    types = getattr(text_config(model), "layer_types", None)
    return None if types is None else ["sliding" not in str(t) for t in types]


def decoder(model: nn.Module) -> nn.Module:
    """The base transformer (``model.model`` for every supported architecture)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not hasattr(base, "layers"):
        raise KVTrimError(f"Cannot find the decoder layers of {type(model).__name__}.")
    return base


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, in layer order."""
    return [layer.self_attn for layer in decoder(model).layers]


def hooked_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention module, query projection) of every layer: what :mod:`kvtrim.core.hooks` hooks."""
    return [(attn, query_projection(attn)[0]) for attn in attention_modules(model)]


def max_context(model: nn.Module) -> int:
    """The longest sequence the model was trained for (its position window)."""
    return int(getattr(text_config(model), "max_position_embeddings", 0) or 0) or 10**9


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def query_projection(attn: nn.Module) -> tuple[nn.Module, int]:
    """The linear layer whose output starts with the queries, and the queries' width."""
    n_heads = attn.config.num_attention_heads
    width = n_heads * attn.head_dim
    if hasattr(attn, "q_proj"):
        return attn.q_proj, width
    if hasattr(attn, "qkv_proj"):  # Phi3 packs q, k, v in one projection; queries come first
        return attn.qkv_proj, width
    raise KVTrimError(f"Cannot find the query projection of {type(attn).__name__}.")


def queries_from_projection(attn: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries from the output of :func:`query_projection` (q-norm applied if any).

    projected: (B, T, >= H*D) -> returns (B, H, T, D)
    """
    _, width = query_projection(attn)
    bsz, seq, _ = projected.shape
    q = projected[..., :width].reshape(bsz, seq, -1, attn.head_dim)  # (B, T, H, D)
    if hasattr(attn, "q_norm"):  # Qwen3, Gemma3 normalise each query head before RoPE
        q = attn.q_norm(q)
    return q.transpose(1, 2)  # (B, H, T, D)


def output_weight(attn: nn.Module) -> torch.Tensor | None:
    """W_o split per query head, (H, D, hidden): a view of ``o_proj.weight``, no copy."""
    proj = getattr(attn, "o_proj", None)
    if proj is None:
        return None
    weight = proj.weight.detach()  # (hidden, H·D)
    heads = attn.config.num_attention_heads
    return weight.view(weight.shape[0], heads, attn.head_dim).permute(1, 2, 0)  # (H, D, hidden)


def rope_function(attn: nn.Module) -> Callable:
    """The architecture's own ``apply_rotary_pos_emb`` (handles partial rotary dims, e.g. Phi3)."""
    module = sys.modules[type(attn).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise KVTrimError(f"Cannot find the RoPE function of {type(attn).__name__}.")
    return fn


@dataclass
class RotaryAt:
    """RoPE cos/sin for arbitrary positions of one layer (Gemma3 has one rotary per layer type).

    Every layer of one compression asks for the same positions (a scorer's window queries, a
    reconstruction chunk's), so the latest cos/sin are kept on the shared rotary module, per layer
    type, and handed back while the positions, the dtype, the device and the module's buffers are
    the same: computed once per forward instead of once per layer, the same tensors."""

    rotary: nn.Module
    layer_type: str | None
    takes_layer_type: bool

    def __call__(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (P,) -> cos, sin: (1, P, rotary_dim) in ``like``'s dtype and device."""
        latest = kept_on(self.rotary, "_kvtrim_latest_rotations")
        state = rotary_state(self.rotary)
        hit = latest.get(self.layer_type)
        if hit is not None and hit.matches(positions, like, state):
            return hit.cos, hit.sin
        pos = positions.to(like.device)[None]  # (1, P)
        if self.takes_layer_type:
            cos, sin = self.rotary(like, pos, self.layer_type)
        else:
            cos, sin = self.rotary(like, pos)
        latest[self.layer_type] = LatestRotation(positions.clone(), like.dtype, like.device, state, cos, sin)
        return cos, sin


def rotary_state(rotary: nn.Module) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...], Any]:
    """What cos/sin depend on besides the positions: the rotary module's buffers (held, so compared
    by identity), their versions and its attention scaling — a dynamic RoPE replaces or updates them.
    An inference tensor has no version counter (and cannot be updated outside inference mode)."""
    buffers = tuple(rotary.buffers())
    versions = tuple(-1 if b.is_inference() else b._version for b in buffers)
    return buffers, versions, getattr(rotary, "attention_scaling", None)


@dataclass
class LatestRotation:
    """One layer type's latest cos/sin and everything they were computed from."""

    positions: torch.Tensor  # (P,), a copy
    dtype: torch.dtype
    device: torch.device
    state: tuple  # rotary_state() when they were computed
    cos: torch.Tensor
    sin: torch.Tensor

    def matches(self, positions: torch.Tensor, like: torch.Tensor, state: tuple) -> bool:
        (buffers, versions, scaling), (own_buffers, own_versions, own_scaling) = state, self.state
        return (
            like.dtype == self.dtype
            and like.device == self.device
            and versions == own_versions
            and scaling == own_scaling
            and all(a is b for a, b in zip(buffers, own_buffers, strict=True))
            and positions.device == self.positions.device
            and bool(torch.equal(positions, self.positions))
        )


def rotary_for(model: nn.Module, attn: nn.Module) -> RotaryAt:
    rotary = decoder(model).rotary_emb
    return RotaryAt(rotary, getattr(attn, "layer_type", None), _takes_layer_type(type(rotary)))


@functools.cache
def _takes_layer_type(rotary_type: type) -> bool:
    """Whether the rotary embedding is called per layer type (Gemma3); one look per class."""
    return "layer_type" in inspect.signature(rotary_type.forward).parameters


@dataclass(frozen=True)
class LayerInternals:
    """What a scorer's view needs of one attention layer, looked up once per model (not per call)."""

    attn: nn.Module
    rope: Callable  # the architecture's apply_rotary_pos_emb
    rotary: RotaryAt
    output_weight: torch.Tensor | None  # (H, D, hidden)
    n_heads: int
    head_dim: int
    scaling: float
    rotations: dict  # averaged RoPE matrices, shared by the layers of one rotary embedding


def layer_internals(model: nn.Module) -> list[LayerInternals]:
    """:class:`LayerInternals` of every attention layer, in layer order."""
    out = []
    for attn in attention_modules(model):
        rotary = rotary_for(model, attn)
        out.append(
            LayerInternals(
                attn=attn,
                rope=rope_function(attn),
                rotary=rotary,
                output_weight=output_weight(attn),
                n_heads=attn.config.num_attention_heads,
                head_dim=attn.head_dim,
                scaling=float(attn.scaling),
                rotations=rotation_cache(rotary.rotary),
            )
        )
    return out


def rotation_cache(rotary: nn.Module) -> dict:
    """Averaged RoPE matrices live on the rotary module itself: shared by every layer and every
    compression of that model, and gone with the model."""
    return kept_on(rotary, "_kvtrim_mean_rotations")


def kept_on(module: nn.Module, name: str) -> dict:
    """A dict stored on ``module`` under ``name`` (created empty the first time)."""
    kept = getattr(module, name, None)
    if kept is None:
        kept = {}
        setattr(module, name, kept)
    return kept
