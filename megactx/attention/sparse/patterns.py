"""Per-head sparse attention patterns for the prefill (MInference, arXiv 2407.02490).

`sparse_attention_config.json` beside the model (the format MInference and vLLM read) is a list over layers of
  {"<head>": [pattern, vertical_size, slash_size, score], ...}
with pattern one of
  vertical_and_slash   keep the top vertical_size columns and slash_size diagonals, estimated per prefill chunk
  a_shape              keep the first vertical_size keys and the slash_size nearest diagonals ("stream_llm")
  block_sparse         keep the top vertical_size 64-key blocks for each query block (mean-pooled scores)
A layer or head the file does not name gets ("vertical_and_slash", 1000, 6096).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from megactx.config import SparseConfig, parse_dtype
from megactx.errors import ConfigError

PATTERNS = ("vertical_and_slash", "a_shape", "block_sparse")
ALIASES = {"stream_llm": "a_shape"}
CONFIG_NAME = "sparse_attention_config.json"


@dataclass(slots=True, frozen=True)
class HeadPattern:
    kind: str
    vertical_size: int
    slash_size: int


DEFAULT_HEAD = HeadPattern("vertical_and_slash", 1000, 6096)


@dataclass(slots=True)
class SparsePatterns:
    """Each layer's {head: HeadPattern}; a layer or head not named gets DEFAULT_HEAD."""
    layers: list[dict[int, HeadPattern]] = field(default_factory=list)

    def head(self, layer: int, head: int) -> HeadPattern:
        if layer < len(self.layers):
            return self.layers[layer].get(head, DEFAULT_HEAD)
        return DEFAULT_HEAD

    def layer_patterns(self, layer: int, num_heads: int, first_head: int = 0) -> list[HeadPattern]:
        """Heads [first_head, first_head + num_heads) of a layer (a tensor-parallel rank's heads)."""
        return [self.head(layer, h) for h in range(first_head, first_head + num_heads)]


def parse_layers(data, where: str) -> list[dict[int, HeadPattern]]:
    """The MInference / vLLM layer list -> per layer {head: HeadPattern}; errors name the entry."""
    if isinstance(data, dict) and "layers" in data:
        data = data["layers"]
    if not isinstance(data, list):
        raise ConfigError(f"{where}: expected a list over layers of {{head: [pattern, vertical, slash, score]}}")
    layers = []
    for li, layer in enumerate(data):
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: layer {li} is not an object mapping head to pattern")
        heads = {}
        for key, entry in layer.items():
            if not str(key).isdigit():
                raise ConfigError(f"{where}: layer {li}: head key {key!r} is not a head index")
            if not isinstance(entry, (list, tuple)) or len(entry) < 3:
                raise ConfigError(f"{where}: layer {li} head {key}: expected [pattern, vertical_size, slash_size, "
                                  f"score], got {entry!r}")
            kind = ALIASES.get(entry[0], entry[0])
            if kind not in PATTERNS:
                raise ConfigError(f"{where}: layer {li} head {key}: unknown pattern {entry[0]!r}; "
                                  f"use one of {', '.join(PATTERNS)}")
            try:
                vertical, slash = int(entry[1]), int(entry[2])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: layer {li} head {key}: budgets must be integers, got {entry[1:3]!r}")
            if vertical < 0 or slash < 0:
                raise ConfigError(f"{where}: layer {li} head {key}: budgets must be >= 0")
            heads[int(key)] = HeadPattern(kind, vertical, slash)
        layers.append(heads)
    return layers


def load_patterns(path: str | Path) -> SparsePatterns:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sparse attention config not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})")
    return SparsePatterns(parse_layers(data, str(path)))


def default_block_size(dtype) -> int:
    """Query rows per kernel block when none is set: 256 in fp32, 512 in 16-bit. A taller block plans a superset
    of the keys (a slash's range is block-wide) but makes fewer, taller flash calls, and small calls lose more
    in bf16 (packing, fixed costs) than in fp32: 512-row blocks were 7-19 % faster in bf16 and 1-14 % slower in
    fp32 on pieces of a 32K prefill of the evaluation model (benchmarks/STUDIES.md)."""
    import torch
    return 256 if dtype in (None, torch.float32, torch.float64) else 512


def resolve_sparse(settings: SparseConfig, model_path: str | Path | None,
                   dtype: str = "fp32") -> tuple[SparseConfig, SparsePatterns] | None:
    """The sparse settings in effect and the heads' patterns, or None when sparse prefill is off.
    Budgets: settings.config_file, else sparse_attention_config.json beside the model, else the default budgets.
    block_size None: by the compute dtype. estimate "auto": vertical-slash when budgets come from a file (a
    model's own budgets are what it ships with), else pooled."""
    if not settings.enabled:
        return None
    config_file = settings.config_file
    if not config_file and model_path is not None:
        beside = Path(model_path)
        beside = (beside if beside.is_dir() else beside.parent) / CONFIG_NAME
        config_file = str(beside) if beside.is_file() else None
    patterns = load_patterns(config_file) if config_file else SparsePatterns()
    estimate = settings.estimate
    if estimate == "auto":
        estimate = "vertical-slash" if config_file else "pooled"
    block = settings.block_size or default_block_size(parse_dtype(dtype))
    return replace(settings, config_file=config_file, estimate=estimate, block_size=block), patterns


def check_context_parallel(cfg: SparseConfig, patterns: SparsePatterns) -> None:
    """Under context parallelism every rank plans from the 64-key groups' means it shares with the others
    (sparse/prefill.py OwnedKeys); the vertical-slash estimate and block-sparse heads read every key itself."""
    if cfg.estimate != "pooled":
        budgets = f" (budgets from {cfg.config_file})" if cfg.config_file else ""
        raise ConfigError(f"--context-parallel-size plans sparse prefill with the pooled estimate only, not "
                          f"{cfg.estimate}{budgets}; add --sparse-estimate pooled, or --no-sparse")
    if any(p.kind == "block_sparse" for layer in patterns.layers for p in layer.values()):
        raise ConfigError(f"--context-parallel-size cannot plan the block-sparse heads of {cfg.config_file}; give "
                          f"--sparse-config a file without them, or add --no-sparse")


def dump_layers(layers: list[dict[int, HeadPattern]], scores: list[dict[int, float]] | None = None) -> list:
    """The inverse of parse_layers: what `megactx sparse search` writes."""
    out = []
    for li, heads in enumerate(layers):
        out.append({str(h): [p.kind, p.vertical_size, p.slash_size,
                             (scores[li].get(h, 0.0) if scores else 0.0)] for h, p in sorted(heads.items())})
    return out
