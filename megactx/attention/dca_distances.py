"""Where Dual Chunk Attention shows each key: the three query positions and the distance each key is seen at.

A query at p (r = p % L, cur = p - r, L the chunk length) sees
  distances [0, r]                         once         (intra keys)
  distances [succ - L + 1, succ]           once         (successive keys, when cur >= L)
  distances [inter - L + 1, inter]         n times      (inter keys, n = cur / L - 1 folded chunks)
with intra, succ and inter its query positions; where the ranges overlap, several keys share a distance that the
trained model saw held by one.
"""
from __future__ import annotations

import torch

from megactx.config import DCAConfig


def query_positions(positions: torch.Tensor, cfg: DCAConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # positions: [T] absolute -> the intra, successive and inter query positions, [T] each
    L = cfg.chunk_len
    intra = positions % L
    succ = torch.clamp(intra + L, max=cfg.chunk_size)
    inter = torch.full_like(positions, min(2 * L - 1, cfg.chunk_size))
    return intra, succ, inter


def apparent_distances(p: int, cfg: DCAConfig) -> torch.Tensor:
    """[p + 1]: the distance at which the query at position p sees each key k <= p, its part's query position
    minus k % L (p - k for every key while p <= chunk_size). Several keys beyond the chunks share one distance."""
    L = cfg.chunk_len
    intra, succ, inter = (int(x[0]) for x in query_positions(torch.tensor([p]), cfg))
    k = torch.arange(p + 1)
    cur = (p // L) * L
    return torch.where(k >= cur, intra, torch.where(k >= cur - L, succ, inter)) - k % L
