"""Shared-distance weighting for Dual Chunk Attention: an experiment, off unless --dca-weigh-shared-distances.

Why: the trained model saw one key at each relative distance; beyond chunk_size + 1 tokens, DCA shows several
keys at one distance (dca_distances.py), and the folded text outweighs the rest. Weighing each key by 1 / m, m the
number of keys at its distance (a -log m bias on its score), gives every distance the softmax mass of one key.

Where: the rows attended densely (a dense prefill, the prompt's dense tail under sparse prefill, every decoded
token); sparse prefill's rows are not weighted. How: per piece of rows [a, b) within one chunk, each part's keys are
cut into blocks; a block whose bias is one value for all its rows and keys is computed by the flash kernel (the
bias added to its log-sum-exp), the others (where an overlap's edge moves with the row) by the same kernel with
the bias as its mask. The blocks' split depends only on positions, so it is computed once a step and shared by
every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megactx.attention.dca_distances import log_multiplicity
from megactx.attention.dense import attention
from megactx.attention.merge import merge_attention
from megactx.config import DCAConfig

BLOCK = 512  # keys per block: a block whose bias varies gets it as the kernel's mask


@dataclass(slots=True)
class KeyBlock:
    part: int  # 0 intra, 1 successive, 2 inter: which query rotation scores these keys
    lo: int
    hi: int
    log_m: float | None  # one value for the whole block (flash kernel), or None: the kernel with `bias` as its mask
    causal: bool = False  # the piece's own keys, one log m for all: the causal flash kernel
    bias: torch.Tensor | None = None  # [n, hi - lo] -log m, -inf after the row


def plan_blocks(a: int, b: int, cfg: DCAConfig) -> list[KeyBlock]:
    """Rows [a, b) within one chunk -> their keys as blocks, each part's equal-valued blocks joined into one."""
    L = cfg.chunk_len
    cur = (a // L) * L
    rows = torch.arange(a, b)
    ranges = [(0, cur, a, False), (0, a, b, True), (1, max(cur - L, 0), cur, False), (2, 0, max(cur - L, 0), False)]
    blocks: list[KeyBlock] = []
    for part, lo, hi, own in ranges:  # own: the rows' own keys, causal
        for x in range(lo, hi, hi - lo if own else BLOCK):
            y = hi if own else min(hi, x + BLOCK)
            log_m = log_multiplicity(rows, torch.arange(x, y), cfg)
            value = log_m[-1, 0]  # the last row sees every key of the block
            visible = torch.isfinite(log_m)
            if bool((log_m[visible] == value).all()) and (own or bool(visible.all())):
                last = blocks[-1] if blocks else None
                if not own and last and last.part == part and last.hi == x and last.log_m == float(value):
                    last.hi = y
                else:
                    blocks.append(KeyBlock(part, x, y, float(value), causal=own and y - x > 1))
            else:
                blocks.append(KeyBlock(part, x, y, None, bias=torch.where(visible, -log_m, float("-inf"))))
    return blocks


def weighted_rows(queries: list[torch.Tensor], blocks: list[KeyBlock], read, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """queries: the rows' intra, successive and inter rotations [n, H, D]; read(lo, hi): k, v [Hkv, m, D] of those
    positions -> out [n, H, D], lse [n, H] over every key with its shared-distance weight."""
    outs, lses = [], []
    for blk in blocks:
        q = queries[blk.part]
        k, v = read(blk.lo, blk.hi, q.dtype)
        if blk.log_m is None:
            o, lse = attention(q, k, v, scale, causal=False, bias=blk.bias)
        else:
            o, lse = attention(q, k, v, scale, causal=blk.causal)
            lse = lse - blk.log_m
        outs.append(o)
        lses.append(lse)
    return merge_attention(outs, lses)
