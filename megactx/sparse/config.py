"""Per-head sparse attention patterns for the prefill (MInference, arXiv 2407.02490; DESIGN.md 3.2).

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
from dataclasses import dataclass, field
from pathlib import Path

from megactx.errors import ConfigError

PATTERNS = ("vertical_and_slash", "a_shape", "block_sparse")
# how the vertical_and_slash heads are planned: from the last queries' columns and diagonals (estimate.py), or
# from every row against pooled 64-key groups (pooled.py), cut by --sparse-mass (default POOLED_CUTOFF).
# "auto" (resolve_sparse): vertical-slash when the heads have budgets from a file or a slash option is set, else
# pooled: it looks at rows all over a chunk (pooled.py) and gave the fastest prefill measured on the evaluation
# model at the same accuracy (BENCHMARKS.md)
ESTIMATES = ("vertical-slash", "pooled")
ESTIMATE_CHOICES = ("auto",) + ESTIMATES
# at 0.7, on the evaluation model at 64K: perplexity 1.025x dense DCA's in the worst 4K bucket (0.8: 1.014x),
# TTFT 2.45x faster (0.8: 2.19x, in another run), passkey correct at depths 10, 50 and 90; at 128K passkey correct
# at depths 0, 25, 50 and 75 (BENCHMARKS.md)
POOLED_CUTOFF = 0.7
ALIASES = {"stream_llm": "a_shape"}
CONFIG_NAME = "sparse_attention_config.json"


@dataclass(slots=True, frozen=True)
class HeadPattern:
    kind: str
    vertical_size: int
    slash_size: int


DEFAULT_HEAD = HeadPattern("vertical_and_slash", 1000, 6096)


@dataclass(slots=True)
class SparseConfig:
    threshold: int = 32768  # prompts longer than this many tokens are prefilled sparsely
    last_q: int = 64  # queries per prefill chunk that estimate the pattern
    block_size: int = 256  # query rows per kernel block (a slash costs this many keys per block: see kernel.py)
    mass: float | None = None  # keep only the best indices reaching this share of the estimated score (estimate.py)
    # the cut-off counts verticals and slashes together: slashes only for what the verticals leave (estimate.py)
    mass_union: bool = False
    # a chunk whose plan computes more than this share of the causal pairs is computed densely: the gathered
    # kernel runs at roughly 70-80 % of the dense kernel's speed per pair, so a denser plan would be slower
    max_density: float = 0.6
    # rows planned from one estimate: a longer prefill chunk is planned in parts, each from its own last queries.
    # A chunk's first rows are the farthest from its last queries, and that is where perplexity was lost with
    # 16K-row estimates (BENCHMARKS.md); 0: one estimate per prefill chunk
    estimate_span: int = 8192
    # isolated slashes computed exactly, one key per row, instead of a block-wide span per block (plan.py):
    # fewer pairs than MInference's block granularity, but a subset of what it computes
    exact_diagonals: bool = False
    # slashes chosen in windows of this many diagonals, the slash budget counted in keys a query row computes at
    # block granularity (estimate.py _top_windows); 0: MInference's top-k diagonals. Off by default: with 128 it
    # cost 18 % perplexity in the worst 4K bucket at 64K (BENCHMARKS.md)
    slash_window: int = 0
    estimate: str = "vertical-slash"  # one of ESTIMATES
    layers: list[dict[int, HeadPattern]] = field(default_factory=list)
    source: str | None = None  # the file the budgets came from, for messages

    def __post_init__(self):
        if self.threshold < 0:
            raise ConfigError(f"--sparse-threshold must be >= 0, got {self.threshold}")
        if self.last_q < 1:
            raise ConfigError(f"--sparse-last-q must be >= 1, got {self.last_q}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ConfigError(f"--sparse-mass must be in (0, 1], got {self.mass}")
        if not 0 < self.max_density <= 1:
            raise ConfigError(f"--sparse-max-density must be in (0, 1], got {self.max_density}")
        if self.estimate_span < 0:
            raise ConfigError(f"--sparse-estimate-span must be >= 0 (0: one estimate per prefill chunk), "
                              f"got {self.estimate_span}")
        if self.slash_window < 0:
            raise ConfigError(f"--sparse-slash-window must be >= 0 (0: off), got {self.slash_window}")
        if self.slash_window and self.mass_union:
            raise ConfigError("--sparse-slash-window and --sparse-mass-union choose the slashes in different ways: "
                              "use one of them")
        if self.estimate not in ESTIMATES:
            raise ConfigError(f"--sparse-estimate {self.estimate!r}: choose one of {', '.join(ESTIMATES)}")
        if self.estimate == "pooled" and (self.slash_window or self.mass_union or self.exact_diagonals):
            raise ConfigError("--sparse-estimate pooled plans key groups, not slashes: drop --sparse-slash-window, "
                              "--sparse-mass-union and --sparse-exact-diagonals")
        if self.block_size < 16:
            raise ConfigError(f"--sparse-block-size {self.block_size}: a kernel block needs at least 16 query rows")

    def head(self, layer: int, head: int) -> HeadPattern:
        if layer < len(self.layers):
            return self.layers[layer].get(head, DEFAULT_HEAD)
        return DEFAULT_HEAD

    def layer_patterns(self, layer: int, num_heads: int) -> list[HeadPattern]:
        return [self.head(layer, h) for h in range(num_heads)]

    @property
    def pooled_cutoff(self) -> float:
        return self.mass if self.mass is not None else POOLED_CUTOFF

    def describe(self) -> str:
        span = f"an estimate every {self.estimate_span} rows" if self.estimate_span else "an estimate per chunk"
        if self.estimate == "pooled":
            from megactx.sparse.pooled import ROW_STRIDE
            return (f"threshold {self.threshold} tokens, pooled block estimate (every {ROW_STRIDE}th row against "
                    f"64-key group means), {span}, cut-off {self.pooled_cutoff} of each block's estimated attention, "
                    f"{self.block_size}-row blocks, dense above density {self.max_density}")
        budgets = f"budgets from {self.source}" if self.source else "default budgets (1000 verticals, 6096 slashes)"
        cut = f", mass cut-off {self.mass}" if self.mass is not None else ""
        cut += " (verticals and slashes together)" if self.mass is not None and self.mass_union else ""
        diagonals = ", isolated slashes as exact diagonals" if self.exact_diagonals else ""
        diagonals += f", slashes in windows of {self.slash_window}, budget in keys" if self.slash_window else ""
        return (f"threshold {self.threshold} tokens, last_q {self.last_q}, {span}, {budgets}{cut}, "
                f"{self.block_size}-row blocks, dense above density {self.max_density}{diagonals}")

    @property
    def diagonal_cost(self) -> int:
        """vertical_slash_plan's diagonal_cost: an exact diagonal costs about a third of a block-wide span
        (benchmarks/sparse_kernel.py measures both); 0: off."""
        return self.block_size // 3 if self.exact_diagonals else 0

    def parts(self, a: int, b: int) -> list[tuple[int, int]]:
        """Rows [a, b) of one prefill piece -> the row ranges planned from one estimate each: as few as the span
        allows, of equal size (a 16K chunk at a multiple of 16K splits exactly like 8K chunks would)."""
        n = b - a
        count = -(-n // self.estimate_span) if self.estimate_span else 1
        edges = [a + (i * n) // count for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))


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


def load_sparse_config(path: str | Path, **settings) -> SparseConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sparse attention config not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})")
    return SparseConfig(layers=parse_layers(data, str(path)), source=str(path), **settings)


def default_block_size(dtype) -> int:
    """Query rows per kernel block when none is set: 256 in fp32, 512 in 16-bit. A taller block plans a superset
    of the keys (a slash's range is block-wide) but makes fewer, taller flash calls, and small calls lose more
    in bf16 (packing, fixed costs) than in fp32. Measured on four pieces captured from a 32K prefill of the
    evaluation model (8192 rows, 24576 keys, the same estimate planned both ways, alternating, best of 3):
    512-row blocks were 7-19 % faster in bf16 (density 0.08-0.49 -> 0.10-0.51) and 1-14 % slower in fp32."""
    import torch
    return 256 if dtype in (None, torch.float32, torch.float64) else 512


def resolve_sparse(model_path: str | Path | None, enabled: bool = True, config_file: str | None = None,
                   threshold: int = 32768, last_q: int = 64, block_size: int | None = None,
                   mass: float | None = None, max_density: float = 0.6,
                   estimate_span: int = 8192, exact_diagonals: bool = False,
                   mass_union: bool = False, slash_window: int = 0,
                   estimate: str = "auto") -> SparseConfig | None:
    """--sparse-config FILE, else sparse_attention_config.json beside the model, else default budgets.
    block_size None: 256 (the engine passes default_block_size(its compute dtype)). estimate "auto": budgets
    from a file or a slash option -> vertical-slash, else pooled (a model's own budgets are what it ships with)."""
    if not enabled:
        return None
    if estimate not in ESTIMATE_CHOICES:
        raise ConfigError(f"--sparse-estimate {estimate!r}: choose one of {', '.join(ESTIMATE_CHOICES)}")
    block_size = block_size or default_block_size(None)
    if not config_file and model_path is not None:
        beside = Path(model_path)
        beside = (beside if beside.is_dir() else beside.parent) / CONFIG_NAME
        config_file = beside if beside.is_file() else None
    if estimate == "auto":
        slash_options = slash_window or mass_union or exact_diagonals
        estimate = "vertical-slash" if config_file or slash_options else "pooled"
    settings = dict(threshold=threshold, last_q=last_q, block_size=block_size, mass=mass, max_density=max_density,
                    estimate_span=estimate_span, exact_diagonals=exact_diagonals, mass_union=mass_union,
                    slash_window=slash_window, estimate=estimate)
    return load_sparse_config(config_file, **settings) if config_file else SparseConfig(**settings)


def dump_layers(layers: list[dict[int, HeadPattern]], scores: list[dict[int, float]] | None = None) -> list:
    """The inverse of parse_layers: what `megactx sparse search` writes."""
    out = []
    for li, heads in enumerate(layers):
        out.append({str(h): [p.kind, p.vertical_size, p.slash_size,
                             (scores[li].get(h, 0.0) if scores else 0.0)] for h, p in sorted(heads.items())})
    return out
