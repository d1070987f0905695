"""int8 keys and values: one scale per head vector, GGUF Q8_0's scheme with the head dimension as its block.

    scale = max |x| / 127   over the head_dim values of one token's key (or value) in one KV head
    q     = round(x / scale) in [-127, 127] (int8)      x ~ q * scale

Why a scale per (token, head) rather than per 128-token KV block: a token's scale is fixed when it is written,
so decode and chunked prefill append to a partly filled block without requantizing what is already there, and
an outlier token (the sinks' keys are often several times larger than the rest) costs precision only to itself.
The scales are fp16 (range and 11 bits of precision well beyond int8's 8): 2 bytes per 64-value head vector, so
the cache takes 53 % of bf16's bytes (the evaluation model at 1M tokens: 6.5 GB instead of 12.3).
"""
from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> q int8 [..., D], scale [..., 1] (SCALE_DTYPE)."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8).to(SCALE_DTYPE)
    q = torch.round(x.float() / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q int8 [..., D], scale [..., 1] -> [..., D] in dtype."""
    return q.to(dtype) * scale.to(dtype)
