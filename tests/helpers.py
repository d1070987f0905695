"""Shared helpers for tests: an engine on a path, all-position logits through chunked prefill, greedy tokens."""
from __future__ import annotations

import torch

from megactx.config import EngineConfig
from megactx.engine.llm_engine import LLMEngine
from megactx.sampling import SamplingParams


def make_engine(path: str, chunk: int = 4096, weight_dtype: str = "fp32", dtype: str = "fp32",
                **settings) -> LLMEngine:
    """fp32 compute and weights by default: these engines are compared with transformers in fp32. settings: any
    other engine setting by its LLM(...) name."""
    return LLMEngine(EngineConfig.from_kwargs(path, weight_dtype=weight_dtype, dtype=dtype,
                                              max_num_batched_tokens=chunk, **settings))


def engine_logits(engine: LLMEngine, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    return torch.cat([logits for _, logits in engine.iter_logits(ids, chunk)])


def token_ids(n: int, seed: int = 0, low: int = 100, high: int = 40000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()


def greedy(engine: LLMEngine, ids: list[int], n: int = 8) -> list[int]:
    """The n tokens one request decodes greedily (EOS ignored), stepping the engine directly."""
    engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    out = []
    while engine.has_unfinished():
        out = [o for o in engine.step() if o.finished] or out
    return out[0].outputs[0].token_ids
