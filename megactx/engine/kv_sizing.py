"""How big the KV cache is and in which dtype: the engine's sizing rules, decided once at start-up."""
from __future__ import annotations

import logging

import torch

from megactx.attention.kv_quant import SCALE_DTYPE, num_groups
from megactx.config import ceil_div, log_fmt_bytes, parse_dtype
from megactx.errors import ConfigError

logger = logging.getLogger(__name__)
DEFAULT_KV_BUDGET = 4 * 2**30


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_cache_dtype(name: str, compute: torch.dtype, model_config, max_model_len: int) -> torch.dtype:
    """auto: the compute dtype, unless one max_model_len sequence's keys and values in it would take more than half
    the available memory; then bf16 (half of fp32's bytes; the 0.5B evaluation model at 1M tokens: 12.3 GB instead
    of 24.6), logged with the reason."""
    if name == "int8":
        return torch.int8
    chosen = parse_dtype(name)
    if chosen is not None:
        return chosen
    need = model_config.kv_bytes_per_token(torch.finfo(compute).bits // 8) * max_model_len
    free = available_memory()
    if compute == torch.float32 and free is not None and need > free // 2:
        logger.warning("KV cache dtype auto: bf16, since %s of fp32 keys and values for max_model_len %d would take "
                       "more than half of the %s available (--kv-cache-dtype fp32 keeps fp32)",
                       log_fmt_bytes(need), max_model_len, log_fmt_bytes(free))
        return torch.bfloat16
    return compute


def kv_cache_budget(cc, sc, model_config, dtype: torch.dtype, max_model_len: int) -> tuple[int, int]:
    """-> bytes a token takes in the cache, and the cache's bytes: --kv-cache-memory (refused when one
    max_model_len sequence does not fit), else enough for min(max_num_seqs, 4) such sequences, at most
    DEFAULT_KV_BUDGET unless one sequence needs more."""
    scales = SCALE_DTYPE.itemsize * num_groups(model_config.head_dim) if dtype == torch.int8 else 0
    per_token = model_config.kv_bytes_per_token(dtype.itemsize, scales)
    need = per_token * ceil_div(max_model_len, cc.block_size) * cc.block_size
    if cc.kv_cache_memory is None:
        return per_token, max(need, min(DEFAULT_KV_BUDGET, need * min(sc.max_num_seqs, 4)))
    if cc.kv_cache_memory < need:
        raise ConfigError(
            f"KV cache memory {log_fmt_bytes(cc.kv_cache_memory)} holds {cc.kv_cache_memory // per_token} tokens, "
            f"fewer than max_model_len {max_model_len} ({log_fmt_bytes(need)}); raise --kv-cache-memory or lower "
            f"--max-model-len")
    return per_token, cc.kv_cache_memory
