"""Context parallelism: a long prompt's tokens, and their keys and values, split over ranks by position.

Ownership: position p belongs to rank (p // stripe) % size, stripe = the prefill chunk / size (stripe_size), so
every chunk of a prompt is split evenly. A step's rows are computed by their owners: the embedding, projections,
norms and MLP of a row run on one rank, which writes the row's keys and values into its own cache. Every rank
has the same paged layout (one block table, kept by rank 0's scheduler); the cache is torch.empty, and a page is
touched only when written, so a rank's memory holds only its stripes. Decode is the same with one row: its
owner computes it, and every rank's part of the keys is read.

Attention of a step, per layer:
  1. the queries of the step's rows are all-gathered: every rank has every row's queries, [T, H, D];
  2. each rank computes every row's attention over the keys it holds (DCA: each of the three parts over its
     keys in that part), each row seeing only keys at or before its position -> out [T, H, D], lse [T, H];
  3. the partials are all-gathered and merged by log-sum-exp (merge.py); each rank keeps its own rows.
Why queries and partials travel, not keys (ring attention): both are [T, H, D] per layer whatever the context,
while a ring passes every cached key by every rank: at 1M tokens of the 0.5B evaluation model that is
1M x 2 KV heads x 64 x 2 (k, v) x 2 bytes = 0.5 GB per layer and chunk, against 4K x 14 x 65 x 4 = 15 MB.

ContextParallel(1) is never built: a one-process backend has cp None.
`stats` is the benchmarks' probe of the communication, as TensorParallel's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megactx.attention.merge import merge_attention


def stripe_size(chunk: int, size: int, block_size: int) -> int:
    """Positions per stripe: the prefill chunk split evenly over the ranks, rounded up to whole KV blocks."""
    per_rank = -(-chunk // size)
    return -(-per_rank // block_size) * block_size


@dataclass
class ContextParallel:
    size: int
    rank: int
    stripe: int  # positions per stripe (stripe_size)
    group: object = None  # the torch.distributed process group (None: the default one)
    stats: dict = field(default_factory=lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})

    def owners(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: [T] -> [T] the rank that computes each row and holds its keys
        return torch.div(positions, self.stripe, rounding_mode="floor") % self.size

    def own_spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """This rank's positions in [lo, hi) as maximal spans, in order."""
        period = self.stripe * self.size
        x = lo // period * period + self.rank * self.stripe
        spans = []
        while x < hi:
            a, b = max(x, lo), min(x + self.stripe, hi)
            if b > a:
                spans.append((a, b))
            x += period
        return spans

    def share_group_means(self, means: torch.Tensor, group: int) -> torch.Tensor:
        """means [Hkv, G, D] of every `group` keys, right for the groups this rank holds (a stripe is a multiple
        of group), anything elsewhere -> right for every group, summed over the ranks. The sparse estimate's one
        collective: [Hkv, G, D] fp32 a layer and prefill piece, 1/64 of the keys' bytes (sparse/prefill.py)."""
        own = self.owners(torch.arange(means.shape[1], device=means.device) * group) == self.rank
        shared = torch.where(own[None, :, None], means, 0.0)  # not a product: an unwritten key may be NaN
        start = time.perf_counter()
        dist.all_reduce(shared, group=self.group)
        self.stats["calls"] += 1
        self.stats["bytes"] += shared.numel() * shared.element_size()
        self.stats["seconds"] += time.perf_counter() - start
        return shared

    def clip(self, bounds: torch.Tensor, entry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key ranges bounds [R, 2] of entries entry [R] -> their parts on this rank's stripes, in the same order:
        a range is cut at every stripe it crosses (sparse/batched.py clip_plan)."""
        period = self.stripe * self.size
        if len(bounds) == 0:
            return bounds, entry
        lo, hi = bounds[:, 0], bounds[:, 1]
        first, last = lo // period, (hi - 1) // period  # the periods each range touches
        count = last - first + 1
        which = torch.repeat_interleave(torch.arange(len(bounds)), count)
        offset = torch.arange(len(which)) - torch.repeat_interleave(count.cumsum(0) - count, count)
        start = (first[which] + offset) * period + self.rank * self.stripe
        part_lo = torch.maximum(lo[which], start)
        part_hi = torch.minimum(hi[which], start + self.stripe)
        keep = part_hi > part_lo
        return torch.stack([part_lo[keep], part_hi[keep]], 1), entry[which[keep]]

    def _all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self.stats["calls"] += 1
        self.stats["bytes"] += x.numel() * x.element_size()
        self.stats["seconds"] += time.perf_counter() - start
        return parts

    def gather_rows(self, mine: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """mine: [T_r, ...] this rank's rows in step order; owners: [T] -> every rank's rows, [T, ...]."""
        counts = torch.bincount(owners, minlength=self.size)
        width = int(counts.max())
        padded = mine.new_zeros((width, *mine.shape[1:]))  # all_gather wants one shape on every rank
        padded[:len(mine)] = mine
        parts = self._all_gather(padded)
        out = mine.new_empty((len(owners), *mine.shape[1:]))
        for r, part in enumerate(parts):
            out[owners == r] = part[:int(counts[r])]
        return out

    def combine(self, out: torch.Tensor, lse: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """out [T, H, D], lse [T, H]: every row's attention over this rank's keys -> [T_r, H, D] the attention
        of this rank's rows (own: their indices) over every rank's keys. Sent as one fp32 [T, H, D + 1] tensor."""
        parts = self._all_gather(torch.cat([out.float(), lse[..., None]], dim=-1))
        rows = [p.index_select(0, own) for p in parts]
        return merge_attention([r[..., :-1] for r in rows], [r[..., -1] for r in rows], out_dtype=out.dtype)[0]
