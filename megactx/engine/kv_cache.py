"""KV block bookkeeping: integers only (the tensors live with the model runner).

Blocks are large (128 tokens by default) and handed out so that a sequence's blocks stay consecutive whenever
possible: attention then reads a sequence's keys as one slice of the cache, without a gather.
"""
from __future__ import annotations

import bisect

from megactx.config import ceil_div
from megactx.engine.sequence import Sequence


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks))  # kept sorted

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, ceil_div(total, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take(seq.block_table[-1] + 1 if seq.block_table else None))

    def _take(self, wanted: int | None) -> int:
        if wanted is not None:
            i = bisect.bisect_left(self.free, wanted)
            if i < len(self.free) and self.free[i] == wanted:
                return self.free.pop(i)
        return self.free.pop(self._new_run_index())

    def _new_run_index(self) -> int:
        """Index in self.free where a new sequence starts: in the longest free run, at its start if nothing
        precedes it (block 0), else halfway, leaving the sequence before it room to grow contiguously."""
        best, best_len, start = 0, 0, 0
        for i in range(1, len(self.free) + 1):
            if i == len(self.free) or self.free[i] != self.free[i - 1] + 1:
                if i - start > best_len:
                    best, best_len = start, i - start
                start = i
        return best if self.free[best] == 0 else best + best_len // 2

    def release(self, seq: Sequence) -> None:
        for b in seq.block_table:
            bisect.insort(self.free, b)
        seq.block_table = []
