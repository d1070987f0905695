"""Shared helpers for tests: an engine on a path, all-position logits through chunked prefill."""
from __future__ import annotations

import torch

from megactx.config import CacheConfig, EngineConfig, SchedulerConfig
from megactx.engine.llm_engine import LLMEngine


def make_engine(path: str, chunk: int = 4096, weight_dtype: str = "fp32", **cache) -> LLMEngine:
    """fp32 weights by default: these engines are compared with transformers in fp32."""
    return LLMEngine(EngineConfig(model=path, weight_dtype=weight_dtype, cache=CacheConfig(**cache),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=chunk)))


def engine_logits(engine: LLMEngine, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    return torch.cat([logits for _, logits in engine.iter_logits(ids, chunk)])


def token_ids(n: int, seed: int = 0, low: int = 100, high: int = 40000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()
