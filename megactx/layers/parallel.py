"""Tensor parallelism (Megatron-LM, arXiv 1909.08053): which part of each weight a rank holds, and the two
collectives the sharded model needs.

Column-parallel layers (the fused qkv and gate_up projections) split their output features: each rank computes
its own heads and its own share of the MLP's intermediate features, with no communication. Row-parallel layers
(o_proj, down_proj) split their input features: each rank's product is a partial sum, added up by one
all-reduce per layer. The embedding and the LM head split the vocabulary: a rank looks up only the ids in its
range (the others give zeros, then one all-reduce), and the LM head's logit shards are gathered.

TensorParallel(1) is one process: every shard is the whole tensor and the collectives do nothing.

`stats` is the benchmarks' probe of the communication: the collectives this rank made, the bytes it handed them
and the seconds it spent in them (waiting for the slower rank included: that is what a step loses).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megactx.errors import ConfigError


@dataclass
class TensorParallel:
    size: int = 1
    rank: int = 0
    group: object = None  # the torch.distributed process group (None: the default one)
    stats: dict = field(default_factory=lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})

    def _count(self, x: torch.Tensor, start: float) -> None:
        self.stats["calls"] += 1
        self.stats["bytes"] += x.numel() * x.element_size()
        self.stats["seconds"] += time.perf_counter() - start

    def split(self, total: int, what: str) -> tuple[int, int]:
        """-> (start, length) of this rank's equal share of `total` (heads, features); it must divide."""
        if total % self.size:
            raise ConfigError(f"the model's {what} ({total}) cannot be split evenly over --tensor-parallel-size "
                              f"{self.size}; choose a size that divides it")
        part = total // self.size
        return self.rank * part, part

    def vocab_split(self, vocab: int) -> tuple[int, int]:
        """Vocabulary shards: padded up to a multiple of the size, so every rank's shard has the same rows."""
        part = -(-vocab // self.size)
        return self.rank * part, part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            start = time.perf_counter()
            dist.all_reduce(x, group=self.group)
            self._count(x, start)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., n] on each rank -> [..., size * n], rank order
        if self.size == 1:
            return x
        start = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self._count(x, start)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()
