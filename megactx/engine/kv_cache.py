"""KV block bookkeeping with automatic prefix caching: integers only (the tensors live with the model runner).

Blocks are large (128 tokens by default) and handed out so that a sequence's blocks stay consecutive whenever
possible: attention then reads a sequence's keys as one slice of the cache, without a gather.

Prefix caching (vLLM's scheme): a full block is named by a hash chain, hash(parent's hash, its token ids), seeded
with a salt that holds everything else a key depends on (model, dtypes, rope and DCA settings: the engine's
cache_salt). A block's name therefore fixes its contents. Blocks are reference-counted: sequences that share a
prefix share its blocks. A block no sequence uses keeps its contents and its name ("evictable", least recently
used first) until its memory is needed; a new sequence first takes over the longest chain of named blocks that
matches its tokens and computes only the rest. Only full blocks are named, and a sequence writes only into blocks
it alone holds, so a shared block never changes. Keys do not depend on the length of the sequence that later
reads them (DCA rotates keys at p % L and applies its temperature to the queries), so the reuse is exact.
"""
from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import OrderedDict

from megactx.config import ceil_div
from megactx.engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: a chain over all tokens up to its end (stable across processes: on disk too)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False, salt: bytes = b""):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching, self.salt = caching, salt
        self.free: list[int] = list(range(num_blocks))  # no contents, kept sorted
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}  # named blocks
        self.cached: dict[bytes, int] = {}  # name -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recent first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

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
            block = self._take(seq.block_table[-1] + 1 if seq.block_table else None)
            self.refs[block] = 1
            seq.block_table.append(block)

    def release(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None  # the most recently used end
                else:
                    bisect.insort(self.free, b)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- prefix caching --------------------------------------------------------------------------------
    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The names of the sequence's first num_blocks full blocks (extended and kept on the sequence)."""
        bs, known = self.block_size, seq.block_hashes
        while len(known) < num_blocks:
            i = len(known)
            known.append(block_hash(known[-1] if known else self.salt, seq.token_ids[i * bs:(i + 1) * bs]))
        return known[:num_blocks]

    def lookup(self, seq: Sequence) -> list[bytes]:
        """The names of the full blocks of the sequence's tokens, except the last token (it must be computed to
        give the next token's logits). None for a sequence that asks for its prompt's logprobs: every prompt
        token must be computed to score it."""
        if not self.caching or seq.params.prompt_logprobs is not None:
            return []
        return self.hashes(seq, (seq.num_tokens - 1) // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks: take over the longest cached chain that starts its tokens; returns the
        tokens it covers (now counted as computed)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for h in self.lookup(seq):
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                self.evictable.pop(block)
            self.refs[block] += 1
            seq.block_table.append(block)
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def register(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """Name the sequence's blocks that became full since the last call; -> the (block, name) pairs that are
        new to the cache (a block whose name another block already holds stays unnamed and is freed after use)."""
        if not self.caching:
            return []
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:  # most decode steps: no block filled up
            return []
        new = []
        for i, h in enumerate(self.hashes(seq, full)[seq.num_registered_blocks:], seq.num_registered_blocks):
            block = seq.block_table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h
                new.append((block, h))
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)
        return new

    def add_cached(self, h: bytes) -> int | None:
        """A free block for contents of name h read from elsewhere (disk): named and evictable, or None when every
        block is in use. The caller writes its contents before any sequence can match it."""
        if h in self.cached or not self.num_free:
            return None
        block = self._take(None)
        self.cached[h] = block
        self.hash_of[block] = h
        self.evictable[block] = None
        return block

    def touch(self, h: bytes) -> None:
        """Mark a cached block as just used (the last to be evicted)."""
        block = self.cached.get(h)
        if block is not None and block in self.evictable:
            self.evictable.move_to_end(block)

    def forget(self, h: bytes) -> None:
        """Drop a name whose contents could not be provided (its block returns to the free list)."""
        block = self.cached.pop(h, None)
        if block is not None and self.refs[block] == 0:
            del self.hash_of[block]
            self.evictable.pop(block, None)
            bisect.insort(self.free, block)

    # ---- free blocks --------------------------------------------------------------------------------
    def _take(self, wanted: int | None) -> int:
        """A block with no holder: `wanted` if it is free or evictable (a sequence stays contiguous even at the
        cost of a cached block), else from the longest free run, else the least recently used evictable one."""
        if wanted is not None:
            i = bisect.bisect_left(self.free, wanted)
            if i < len(self.free) and self.free[i] == wanted:
                return self.free.pop(i)
            if wanted in self.evictable:
                self._evict(wanted)
                return wanted
        if self.free:
            return self.free.pop(self._new_run_index())
        block = next(iter(self.evictable))
        self._evict(block)
        return block

    def _evict(self, block: int) -> None:
        del self.evictable[block]
        del self.cached[self.hash_of.pop(block)]

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
