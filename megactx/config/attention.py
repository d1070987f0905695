"""The long-context settings: Dual Chunk Attention and sparse prefill.

Each class is both what the user asks for (fields left None take defaults from the model) and, once resolved
against the model, what the attention backend runs with: DCAConfig.resolve fills every field from the model's
`dual_chunk_attention_config` or its trained length; the sparse settings are resolved against the model's
budgets file by megactx.attention.sparse.patterns.resolve_sparse.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from megactx.config.fields import setting
from megactx.errors import ConfigError

TEMPERATURES = ("position", "total", "none")
ESTIMATES = ("vertical-slash", "pooled")
# The pooled estimate's default cut-off: each query block keeps the key groups holding this share of its
# estimated attention (chosen on the evaluation model: BENCHMARKS.md, sparse prefill)
POOLED_CUTOFF = 0.7


@dataclass(slots=True)
class DCAConfig:
    """Dual Chunk Attention (An et al. 2024, arXiv 2402.17463): run beyond the trained length without training."""
    prefix: ClassVar[str] = "dca_"
    title: ClassVar[str] = "Dual Chunk Attention (run beyond the trained length without training)"

    enabled: bool = setting(False, "turn DCA on (on by default for models whose config has "
                                   "dual_chunk_attention_config)", name="dca")
    chunk_size: int | None = setting(None, "query position clamp (default: the trained length)", type=int)
    local_size: int | None = setting(
        None, "exact-position window into the previous chunk (default: chunk size / 16). Half the chunk size keeps "
              "the nearest half-chunk of keys at their true distances, nearer than any folded key (README)", type=int)
    original_max_position: int | None = setting(
        None, "trained length used by the attention temperature (default: the trained length)", type=int)
    temperature: str | None = setting(
        None, "YaRN-style attention temperature, factor max(1, 0.1 ln(x / trained) + 1) squared on the logits, "
              "x the query's position + 1 (position), the sequence's length (total), or off (none). Default: "
              "position (no change below the trained length; at 1M tokens, 32x the 0.5B model's, the passkey "
              "needs it)",
        choices=TEMPERATURES)
    allow_long_context: bool = setting(False, "allow --max-model-len beyond the trained length with plain RoPE "
                                              "(ablations)", name="allow_long_context")

    def __post_init__(self):
        if self.temperature is not None and self.temperature not in TEMPERATURES:
            raise ConfigError(f"unknown DCA temperature {self.temperature!r}; choose from {', '.join(TEMPERATURES)}")
        for name in ("chunk_size", "local_size", "original_max_position"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--dca-{name.replace('_', '-')} must be >= 1, got {value}")
        if self.chunk_size is not None and self.local_size is not None and not self.local_size < self.chunk_size:
            raise ConfigError(f"Dual Chunk Attention needs 0 < local_size < chunk_size, got local_size "
                              f"{self.local_size} and chunk_size {self.chunk_size}")

    def resolve(self, model_config) -> DCAConfig | None:
        """The settings in effect, every field filled, or None when DCA is off. The model's
        dual_chunk_attention_config turns it on; `enabled` turns it on for any RoPE model with defaults from the
        trained length; explicit values override either. Default temperature: "position", Qwen2.5-1M's recipe.
        "none" gives slightly lower perplexity at 2-4x the trained length (benchmarks/STUDIES.md) but at 32x
        (1M tokens on the 0.5B evaluation model) the question's attention drowns in the filler without it."""
        block = model_config.dual_chunk_attention_config or {}
        if not block and not self.enabled:
            return None
        trained = model_config.trained_context_length
        chunk = int(self.chunk_size or block.get("chunk_size") or trained)
        local = int(self.local_size or block.get("local_size") or max(1, chunk // 16))
        original = int(self.original_max_position or block.get("original_max_position_embeddings") or trained)
        return replace(self, enabled=True, chunk_size=chunk, local_size=local, original_max_position=original,
                       temperature=self.temperature or "position")

    @property
    def chunk_len(self) -> int:
        """L = chunk_size - local_size: the real chunk length (chunk_size itself only clamps query positions)."""
        return self.chunk_size - self.local_size

    def describe(self) -> str:
        return (f"chunk_size {self.chunk_size}, local_size {self.local_size} (chunk length {self.chunk_len}), "
                f"original_max_position_embeddings {self.original_max_position}, temperature {self.temperature}")


@dataclass(slots=True)
class SparseConfig:
    """Sparse prefill (MInference, arXiv 2407.02490) of prompts longer than `threshold` tokens."""
    prefix: ClassVar[str] = "sparse_"
    title: ClassVar[str] = "Sparse prefill (MInference-style, for prompts above a threshold)"

    enabled: bool = setting(True, "prefill every prompt densely", name="sparse", flag="--no-sparse", negate=True)
    config_file: str | None = setting(
        None, "per-head budgets JSON for the vertical-slash estimate (default: sparse_attention_config.json beside "
              "the model, else 1000 verticals / 6096 slashes per head)", name="sparse_config")
    threshold: int = setting(32768, "prompts longer than this many tokens are prefilled sparsely")
    estimate: str = setting(
        "auto", "how heads are planned: 'pooled' (every 4th query row against each 64-key group's mean key; groups "
                "kept up to --sparse-mass of each block's estimated attention) or 'vertical-slash' (MInference: the "
                "budgets' columns and diagonals from each chunk's last queries); auto: vertical-slash with budgets "
                "from a file, else pooled", choices=("auto",) + ESTIMATES)
    mass: float | None = setting(
        None, f"the estimate's cut-off. Pooled: the share of each block's estimated attention its key groups keep "
              f"(default {POOLED_CUTOFF}). Vertical-slash: per head, keep only the best verticals and slashes "
              f"(within the budgets) that reach this share (default: whole budgets)", type=float)
    max_keys: int | None = setting(
        None, "pooled: at most this many keys (the best 64-key groups) per query block besides the sinks, the "
              "local keys and each DCA part's first group, whatever the context's length: attention that grows "
              "linearly with it (default: no cap, the cut-off alone)", type=int)
    coarse_refine: int | None = setting(
        None, "pooled: score 1,024-key super-groups first and refine only this many of them per query block (plus "
              "the sinks' and the local ones) into 64-key groups: an estimate 10x cheaper at 1M tokens (default: "
              "every 64-key group scored)", type=int)
    dense_tail: int = setting(256, "the prompt's last this many tokens (where a long prompt asks its question) "
                                   "attend to every key, not to a sparse plan: the question's rows never miss the "
                                   "text they ask about (0: every row sparse)")
    max_density: float = setting(0.6, "a prefill chunk whose plan computes more than this share of the causal pairs "
                                      "is computed densely, where sparse would be slower (1: always sparse)")
    # set from Python (LLM(..., sparse_last_q=...)), not flags: tuning knobs of the estimate and the kernel
    last_q: int = setting(64, "last queries of each prefill chunk that estimate the vertical-slash pattern",
                          cli=False)
    estimate_span: int = setting(8192, "a prefill chunk longer than this many rows is planned in parts, each "
                                       "from its own estimate (0: one estimate per chunk)", cli=False)
    block_size: int | None = setting(None, "query rows per kernel block (default: 256 in fp32, 512 in bf16 and "
                                           "fp16)", cli=False, type=int)

    def __post_init__(self):
        if self.threshold < 0:
            raise ConfigError(f"--sparse-threshold must be >= 0, got {self.threshold}")
        if self.last_q < 1:
            raise ConfigError(f"sparse_last_q must be >= 1, got {self.last_q}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ConfigError(f"--sparse-mass must be in (0, 1], got {self.mass}")
        if not 0 < self.max_density <= 1:
            raise ConfigError(f"--sparse-max-density must be in (0, 1], got {self.max_density}")
        if self.max_keys is not None and self.max_keys < 64:
            raise ConfigError(f"--sparse-max-keys must be at least 64 (one key group), got {self.max_keys}")
        if self.coarse_refine is not None and self.coarse_refine < 0:
            raise ConfigError(f"--sparse-coarse-refine must be >= 0, got {self.coarse_refine}")
        if self.dense_tail < 0:
            raise ConfigError(f"--sparse-dense-tail must be >= 0 (0: every row sparse), got {self.dense_tail}")
        if self.estimate_span < 0:
            raise ConfigError(f"sparse_estimate_span must be >= 0 (0: one estimate per prefill chunk), "
                              f"got {self.estimate_span}")
        if self.estimate not in ("auto",) + ESTIMATES:
            raise ConfigError(f"--sparse-estimate {self.estimate!r}: choose one of auto, {', '.join(ESTIMATES)}")
        if self.block_size is not None and self.block_size < 16:
            raise ConfigError(f"sparse_block_size {self.block_size}: a kernel block needs at least 16 query rows")

    @property
    def pooled_cutoff(self) -> float:
        return self.mass if self.mass is not None else POOLED_CUTOFF

    def describe(self) -> str:
        span = f"an estimate every {self.estimate_span} rows" if self.estimate_span else "an estimate per chunk"
        if self.estimate == "pooled":
            return (f"threshold {self.threshold} tokens, pooled block estimate (every 4th row against 64-key group "
                    f"means), {span}, cut-off {self.pooled_cutoff} of each block's estimated attention"
                    f"{f' and at most {self.max_keys} keys' if self.max_keys else ''}"
                    f"{f', {self.coarse_refine} super-groups refined' if self.coarse_refine is not None else ''}, "
                    f"{self.block_size}-row blocks, dense above density {self.max_density}")
        budgets = f"budgets from {self.config_file}" if self.config_file else \
            "default budgets (1000 verticals, 6096 slashes)"
        cut = f", mass cut-off {self.mass}" if self.mass is not None else ""
        return (f"threshold {self.threshold} tokens, last_q {self.last_q}, {span}, {budgets}{cut}, "
                f"{self.block_size}-row blocks, dense above density {self.max_density}")

    def sparse_end(self, a: int, b: int, prompt_len: int) -> int:
        """Rows [a, b) of a prompt of prompt_len tokens -> where its sparse rows end: the rows from there to b are
        the prompt's dense tail."""
        return max(a, min(b, prompt_len - self.dense_tail))

    def parts(self, a: int, b: int) -> list[tuple[int, int]]:
        """Rows [a, b) of one prefill piece -> the row ranges planned from one estimate each: as few as the span
        allows, of equal size (a 16K chunk at a multiple of 16K splits exactly like 8K chunks would)."""
        n = b - a
        count = -(-n // self.estimate_span) if self.estimate_span else 1
        edges = [a + (i * n) // count for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))
