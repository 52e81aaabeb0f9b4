"""Tiny random models (seconds to build) for every supported architecture, and a character tokenizer."""

from __future__ import annotations

import os
import string

# Tests never reach a model hub: a missing model must fail at once, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHARS = list(string.printable)
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = SPECIALS + CHARS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable character: exact, offline, and tiny."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, max_positions: int = 1024):
    common = dict(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**common, head_dim=16, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "gemma3":
        return Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4},
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
    if arch == "phi3":
        return Phi3Config(**common)
    raise ValueError(arch)


def make_model(arch: str, max_positions: int = 1024, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, max_positions)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    # Random init is near-uniform; scale up so attention is peaked and greedy outputs are not all ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama with a 512-token window, built once per module (tests only read it)."""
    return make_model("llama", max_positions=512)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch):
    return make_model(arch)


def sample_text(n_chars: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "lamp", "tower", "north", "amber"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(words[int(torch.randint(len(words), (1,), generator=gen))])
    return " ".join(out)[:n_chars]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other processes load the CPUs);
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """A fresh kvtrim cache dir (calibrations) for one test module: nothing leaks between runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVTRIM_CACHE_DIR", str(tmp_path_factory.mktemp("kvtrim-cache")))
        yield


def close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-7) -> None:
    """Same shape, same infinite entries, finite entries equal within tolerance."""
    got, expected = got.double(), expected.double()
    assert got.shape == expected.shape
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=rtol, atol=atol)


def run_calibrate(tmp_path, what: str, sequences: int, length: int = 150):
    """``kvtrim calibrate --what WHAT`` on a saved tiny Llama and a text file, in a fresh process
    with its own cache (nothing imported beforehand), as a user runs it."""
    from cli_runner import run_process

    model_dir = tmp_path / "tiny"
    make_model("llama", max_positions=512).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(sample_text(4000, seed=5))
    args = ["calibrate", "--model", str(model_dir), "--what", what, "--text", str(text)]
    env = {"KVTRIM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return run_process(*args, "--sequences", str(sequences), "--length", str(length), env=env)
