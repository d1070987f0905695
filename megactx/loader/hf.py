"""Hugging Face checkpoints: config.json + *.safetensors (single file or sharded with an index)."""
from __future__ import annotations

import json
import os

from megactx.config import ModelConfig
from megactx.errors import ModelLoadError


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def open_hf_dir(path: str):
    from megactx.loader import ModelSource
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path}: no config.json; a Hugging Face model directory needs config.json and *.safetensors")
    config = ModelConfig.from_hf_dict(read_json(cfg_path), source=cfg_path)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = read_json(gen_path).get("eos_token_id")
        extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + extra))

    files = _safetensors_files(path)
    names = _check_files(files)

    def iter_weights():
        from safetensors import safe_open
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return ModelSource(path=path, format="hf", config=config, iter_weights=iter_weights, weight_names=names)


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ModelLoadError(f"{index}: weight_map is empty")
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"{missing[0]}: shard listed in {os.path.basename(index)} is missing")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def _check_files(files: list[str]) -> set[str]:
    """Open every header and check the data size, so a truncated file fails before anything is loaded."""
    from safetensors import safe_open
    names: set[str] = set()
    for file in files:
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError("header length beyond the end of the file")
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError(f"file is truncated: {size} bytes, the header needs {8 + header_len + end}")
            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    return names
