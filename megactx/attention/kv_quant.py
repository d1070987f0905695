"""int8 keys and values: one scale per GROUP values of a head vector, GGUF Q8_0's scheme (blocks of 16, not 32).

    scale = max |x| / 127   over GROUP consecutive values of one token's key (or value) in one KV head
    q     = round(x / scale) in [-127, 127] (int8)      x ~ q * scale

Why scales per token rather than per 128-token KV block: a token's scales are fixed when it is written, so decode
and chunked prefill append to a partly filled block without requantizing what is already there, and an outlier
token (the sinks' keys are often several times larger than the rest) costs precision only to itself.
Why 16 values per scale: rotated keys carry a few channels many times larger than the rest, and one scale per
64-value head vector left the others a handful of levels. Measured on the evaluation model (8K tokens of the
standard library, DCA, sparse prefill, perplexity per 4K bucket, bf16 KV = 5.058 / 2.461): one scale per head
vector 5.154 / 2.507 (+1.9 %), per 32 values 5.153 / 2.477, per 16 values 5.083 / 2.473 (+0.5 %).
The scales are fp16: 8 bytes per 64-value head vector, so the cache takes 56 % of bf16's bytes (the evaluation
model at 1M tokens: 6.9 GB instead of 12.3).
"""
from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
GROUP = 16  # values per scale


def num_groups(head_dim: int) -> int:
    return max(1, head_dim // GROUP)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> q int8 [..., D], scale [..., D / GROUP] (SCALE_DTYPE)."""
    g = num_groups(x.shape[-1])
    xs = x.float().unflatten(-1, (g, -1))
    scale = (xs.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-7).to(SCALE_DTYPE)  # fp16 keeps 1e-7 (not 0)
    q = torch.round(xs / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q.flatten(-2), scale[..., 0]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q int8 [..., D], scale [..., D / GROUP] -> [..., D] in dtype."""
    return (q.unflatten(-1, (scale.shape[-1], -1)).to(dtype) * scale.to(dtype)[..., None]).flatten(-2)
