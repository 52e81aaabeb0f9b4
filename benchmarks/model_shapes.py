"""Randomly initialised models of published shapes, for speed and memory figures that need no
weights: what a scorer or a cache costs depends on a model's shapes, not on what its weights
learnt (answers from these models mean nothing).

    from model_shapes import SHAPES, random_model  # benchmarks/ is on the path when a script here runs
"""

from __future__ import annotations

import string
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_VOCAB = ["<unk>", "<s>", "</s>", *string.printable]


def _llama3(max_positions: int, vocab_size: int, rope_factor: float, **widths: object) -> LlamaConfig:
    """A Llama 3 config: its RoPE (θ = 500,000, "llama3" scaling from 8,192 positions) and ``widths``."""
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(max_positions, 16_384),  # above the 8,192 its RoPE scales from
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": rope_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        **widths,
    )


def llama_8b_config(max_positions: int, vocab_size: int = 128_256) -> LlamaConfig:
    """Llama-3.1-8B's shapes (its published config)."""
    return _llama3(
        max_positions,
        vocab_size,
        rope_factor=8.0,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )


def llama_1b_config(max_positions: int, vocab_size: int = 128_256) -> LlamaConfig:
    """Llama-3.2-1B's shapes (its published config): 16 layers of 32 query / 8 KV heads of 64."""
    return _llama3(
        max_positions,
        vocab_size,
        rope_factor=32.0,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )


def tiny_config(max_positions: int, vocab_size: int = len(_VOCAB)) -> LlamaConfig:
    """Three layers of width 64: checks a script's code, not its figures."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
    )


#: name -> config(max_positions, vocab_size)
SHAPES: dict[str, Callable[..., LlamaConfig]] = {
    "llama-3.1-8b": llama_8b_config,
    "llama-3.2-1b": llama_1b_config,
    "tiny": tiny_config,
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character: a text of N characters is N tokens (no download)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """``config``'s model with seeded random weights, built directly on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    return model.eval()
