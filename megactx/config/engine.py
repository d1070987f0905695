"""EngineConfig: every engine setting, grouped by concern, each group checked in its own __post_init__.

    EngineConfig(model, dtype, ..., cache=CacheConfig(...), scheduler=SchedulerConfig(...),
                 dca=DCAConfig(...), sparse=SparseConfig(...))

`EngineConfig.from_kwargs(model, max_model_len=8192, dca=True, sparse_mass=0.8)` builds it from flat keyword
arguments, the names `LLM(...)` takes and the command line's flags carry (`--max-model-len`, `--dca`,
`--sparse-mass`): a group's field is named by the group's prefix and the field's name unless the field says
otherwise (megactx/config/fields.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from megactx.config.attention import DCAConfig, SparseConfig
from megactx.config.fields import parse_bytes, parse_dtype, setting
from megactx.errors import ConfigError


@dataclass(slots=True)
class CacheConfig:
    prefix: ClassVar[str] = ""
    title: ClassVar[str] = "KV cache"

    # large blocks keep a sequence's keys contiguous, so attention reads them in place
    block_size: int = setting(128, "tokens per KV block", cli=False)
    kv_cache_dtype: str = setting("auto", "auto (the compute dtype; bf16 when fp32 keys and values of one "
                                          "max-model-len sequence would take over half the available memory), "
                                          "fp32, bf16, fp16, int8 (a scale per 16 values: 56 percent of bf16's "
                                          "memory)")
    kv_cache_memory: str | int | None = setting(
        None, "KV cache size, e.g. 8GiB (default: enough for max-model-len x min(max-num-seqs, 4), at most 4 GiB)",
        type=str)
    prefix_caching: bool = setting(True, "recompute every prompt: no reuse of the KV blocks of earlier requests' "
                                         "prefixes", name="prefix_caching", flag="--no-prefix-caching", negate=True)
    kv_cache_dir: str | None = setting(None, "keep the prefix cache's blocks on disk in this directory too: a "
                                             "restarted engine reuses the documents it has seen")
    kv_cache_disk_size: str | int | None = setting(
        None, "size limit of --kv-cache-dir, e.g. 50GiB; least recently used blocks go first (default: half the "
              "free space)", type=str)

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype != "int8":
            parse_dtype(self.kv_cache_dtype)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.kv_cache_disk_size is not None:
            self.kv_cache_disk_size = parse_bytes(self.kv_cache_disk_size)
            if self.kv_cache_disk_size <= 0:
                raise ConfigError(f"kv_cache_disk_size must be positive, got {self.kv_cache_disk_size}")
        if self.kv_cache_dir is not None and not self.prefix_caching:
            raise ConfigError("--kv-cache-dir keeps the prefix cache on disk; it cannot be used with "
                              "--no-prefix-caching")


@dataclass(slots=True)
class SchedulerConfig:
    prefix: ClassVar[str] = ""
    title: ClassVar[str] = "Scheduling"

    max_model_len: int | None = setting(None, "the longest sequence, prompt and output (default: the model's "
                                              "context length)", type=int)
    max_num_seqs: int = setting(16, "sequences running at once")
    max_num_batched_tokens: int = setting(4096, "tokens per engine step: the prefill chunk size")

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(slots=True)
class ParallelConfig:
    prefix: ClassVar[str] = ""
    title: ClassVar[str] = "Parallelism (torch.distributed)"

    tensor_parallel_size: int = setting(1, "processes that split every layer's heads, features and vocabulary "
                                           "(Megatron-style); on one machine the engine starts the others itself")
    context_parallel_size: int = setting(1, "processes that split a long prompt's tokens and its KV cache by "
                                            "position (stripes of max-num-batched-tokens / N tokens, whole "
                                            "64-key groups with sparse prefill), attention merged by log-sum-exp; on "
                                            "one machine the engine starts the others itself")
    dist_host: str = setting("127.0.0.1", "address of rank 0 for the ranks' rendezvous")
    dist_port: int = setting(0, "port of the rendezvous on rank 0 (0: a free one, on one machine)")
    dist_timeout: float = setting(120.0, "seconds a rank waits for the others (start-up, every step) before the "
                                         "engine ends with an error", type=float)
    rank: int = setting(0, "this process's rank (set for the processes the engine starts)", cli=False)

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.context_parallel_size < 1:
            raise ConfigError(f"--context-parallel-size must be >= 1, got {self.context_parallel_size}")
        if self.tensor_parallel_size > 1 and self.context_parallel_size > 1:
            raise ConfigError("--tensor-parallel-size and --context-parallel-size above 1 together are not "
                              "supported yet; choose one of them")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside the group of {self.world_size} processes")
        if not 0 <= self.dist_port < 65536:
            raise ConfigError(f"--dist-port must be a port number (0-65535), got {self.dist_port}")
        if self.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be positive, got {self.dist_timeout}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.context_parallel_size

    @property
    def kind(self) -> str:
        """How the group splits the work, for messages."""
        return "context-parallel" if self.context_parallel_size > 1 else "tensor-parallel"


@dataclass(slots=True)
class EngineConfig:
    prefix: ClassVar[str] = ""
    title: ClassVar[str] = "Model and compute"

    model: str | None = setting(None, "HF directory or .gguf file (default: the bundled SmolLM2)")
    tokenizer: str | None = setting(None, "tokenizer directory or file (default: the model's own)", cli=False)
    dtype: str = setting("auto", "compute dtype: auto (bf16 on CPUs with AMX, several times faster there; fp32 "
                                 "on other CPUs: on AVX512-BF16 bf16 prefills 1.2-1.4x faster but decodes 2x "
                                 "slower, without it bf16 is emulated), fp32, bf16, fp16")
    weight_dtype: str = setting("auto", "storage of the weight matrices: auto (fp16 for quantized GGUF on CPU, "
                                        "else --dtype), fp32, fp16, bf16")
    packed_weights: str = setting("auto", "an extra fp32 copy of the weights packed for oneDNN, for batched "
                                          "decoding on CPU (auto: when max-num-seqs > 1 and the copy takes at "
                                          "most 4 GiB)", choices=("auto", "on", "off"))
    device: str = setting("cpu", "torch device")
    num_threads: int | None = setting(None, "torch threads (default: torch's choice)", flag="--threads", type=int)
    seed: int = setting(0, "seed of torch's global generator", cli=False)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dca: DCAConfig = field(default_factory=DCAConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        parse_dtype(self.dtype)
        parse_dtype(self.weight_dtype)
        if self.packed_weights not in ("auto", "on", "off"):
            raise ConfigError(f"packed_weights must be auto, on or off, got {self.packed_weights!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.parallel.world_size > 1 and self.cache.kv_cache_dir is not None:
            flag = "--tensor-parallel-size" if self.parallel.tensor_parallel_size > 1 else "--context-parallel-size"
            raise ConfigError(f"--kv-cache-dir with {flag} above 1 is not supported yet (each rank holds only its "
                              "part of the keys and values); drop one of them")

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs) -> "EngineConfig":
        """Flat keyword arguments (LLM(...)'s, the flags' dests) -> the nested config; an unknown name is an error
        that lists the known ones."""
        groups = {name: group(**{f.name: kwargs.pop(key) for key, f in flat_fields(group).items() if key in kwargs})
                  for name, group in GROUPS.items()}
        own = {f.name: kwargs.pop(key) for key, f in flat_fields(cls).items() if key in kwargs}
        if kwargs:
            known = sorted(k for c in (cls, *GROUPS.values()) for k in flat_fields(c))
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(kwargs))}; known: {', '.join(known)}")
        return cls(**{**own, "model": model}, **groups)


GROUPS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "dca": DCAConfig, "sparse": SparseConfig,
          "parallel": ParallelConfig}


def flat_fields(cls) -> dict:
    """{flat name: dataclass field} of one config class's own settings (not its nested groups)."""
    return {(f.metadata.get("name") or cls.prefix + f.name): f for f in fields(cls) if f.metadata}
