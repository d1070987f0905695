"""Configuration dataclasses, each checked in __post_init__.

ModelConfig is the architecture as read from a Hugging Face config.json (or the equivalent GGUF metadata);
the others are engine settings chosen by the user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megactx.errors import ConfigError, ModelLoadError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling / rope_parameters, without rope_theta
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: True (q, k, v carry a bias)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dual_chunk_attention_config: dict[str, Any] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default")) or "default"

    @property
    def trained_context_length(self) -> int:
        """The length the model was trained on (before any rope scaling)."""
        rs = self.rope_scaling or {}
        if self.rope_type != "default" and "original_max_position_embeddings" in rs:
            return int(rs["original_max_position_embeddings"])
        return self.max_position_embeddings

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x and 5.x spellings)."""
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            arch = {"llama": "llama", "qwen2": "qwen2"}.get(cfg.get("model_type", ""))
        if arch is None:
            raise ModelLoadError(
                f"{source}: unknown architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ModelLoadError(f"{source}: missing required key(s) {', '.join(missing)}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        heads = cfg["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=rope or None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dual_chunk_attention_config=cfg.get("dual_chunk_attention_config"),
        )


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16", "auto": "auto"}


def parse_dtype(name: str):
    import torch
    key = DTYPES.get(str(name).lower())
    if key is None:
        raise ConfigError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return None if key == "auto" else getattr(torch, key)


def parse_bytes(text: str | int | float) -> int:
    """'4GiB', '512M', '1.5G', 1e9 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 1000000000") from None


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 128  # tokens per KV block; large blocks keep a sequence's keys contiguous
    kv_cache_dtype: str = "auto"  # auto = the compute dtype
    kv_cache_memory: int | None = None  # bytes; None = enough for max_model_len x min(max_num_seqs, 4), at most 4 GiB

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        parse_dtype(self.kv_cache_dtype)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 4096  # tokens per engine step (prefill chunk + decodes)
    max_model_len: int | None = None  # None = the model's max_position_embeddings

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None = the bundled SmolLM2
    tokenizer: str | None = None  # defaults to the model's own
    # compute dtype. bf16 runs the matmuls and the flash kernel in bf16: on a CPU with AMX tiles that prefills
    # about 4x faster than fp32 (BENCHMARKS.md); on one without, fp32 is the fastest (DESIGN.md 4)
    dtype: str = "fp32"
    weight_dtype: str = "auto"  # storage of the matrices; auto = fp16 for quantized GGUF on CPU, else dtype
    # an extra fp32 copy of the matrices packed for oneDNN, for batched decoding on CPU (layers/linear.py):
    # auto = on when more than one sequence may run and the copy takes at most 4 GiB
    packed_weights: str = "auto"
    device: str = "cpu"
    seed: int = 0
    num_threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Dual Chunk Attention: on when the model's config has dual_chunk_attention_config, or with dca=True
    dca: bool = False
    dca_chunk_size: int | None = None  # default: the trained length
    dca_local_size: int | None = None  # default: chunk_size / 16
    dca_original_max_position: int | None = None  # default: the trained length
    dca_temperature: str | None = None  # position | total | none; None: by source (attention/dca.py resolve_dca)
    allow_long_context: bool = False  # run plain RoPE beyond the trained length anyway (ablations)
    # Sparse prefill (MInference vertical-slash): prompts longer than sparse_threshold tokens
    sparse: bool = True
    sparse_config: str | None = None  # default: sparse_attention_config.json beside the model, else default budgets
    sparse_threshold: int = 32768
    sparse_last_q: int = 64
    sparse_mass: float | None = None  # keep only the best indices reaching this share of the estimated score
    sparse_max_density: float = 0.6  # a chunk planned denser than this is computed densely (sparse would be slower)
    sparse_estimate_span: int = 8192  # rows planned from one estimate (0: one per prefill chunk)
    sparse_exact_diagonals: bool = False  # isolated slashes one key per row instead of a block-wide span
    sparse_mass_union: bool = False  # the mass cut-off counts verticals and slashes together
    sparse_slash_window: int = 0  # slashes chosen in windows of this many diagonals, the budget in keys (0: off)
    sparse_block_size: int | None = None  # query rows per kernel block; None: by dtype (sparse/config.py)
    # "vertical-slash" (budgets), "pooled" (every row against 64-key group means, sparse/pooled.py), or "auto":
    # vertical-slash when budgets come from a file, else pooled (sparse/config.py resolve_sparse)
    sparse_estimate: str = "auto"

    def __post_init__(self):
        parse_dtype(self.dtype)
        parse_dtype(self.weight_dtype)
        if self.packed_weights not in ("auto", "on", "off"):
            raise ConfigError(f"packed_weights must be auto, on or off, got {self.packed_weights!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def log_fmt_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    i = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** i:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][i]}"
