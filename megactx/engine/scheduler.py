"""Scheduler: decides, each step, how many tokens of which sequences to compute. Integers only.

There is no prefill phase and no decode phase (vLLM v1's model): every sequence has num_computed_tokens
catching up with its num_tokens. A step has a budget of max_num_batched_tokens; decodes are served first (one
token each, so streams keep moving while a long prompt is prefilled in chunks), and the rest is shared between
the prompts being prefilled, running or newly admitted, so a short prompt arriving during a 100K-token prefill
gets its first token after one step instead of after the whole prefill. A sequence admitted with a prefix in the
prefix cache starts with those tokens computed (kv_cache.py); one whose next block another running sequence is
computing waits for it, so concurrent questions about one document compute the document once. When KV blocks run out, the most recently admitted
running sequence is preempted: its blocks are released and it is recomputed later (never dropped), from whatever
of it is still cached.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from megactx.config import SchedulerConfig
from megactx.engine.kv_cache import BlockAllocator
from megactx.engine.sequence import Sequence, Status

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step: positions [num_computed_tokens, + num_tokens)

    @property
    def completes(self) -> bool:
        """This chunk reaches the end of the sequence: its last position's logits give the next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    cached_tokens: int = 0  # prompt tokens the sequences admitted this step took from the prefix cache

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        # Decodes (one pending token) before prefills, whatever the admission order: a stream keeps moving
        # while a long prompt is prefilled.
        order = sorted(self.running, key=lambda s: s.num_pending_tokens > 1)
        prefills_left = sum(s.num_pending_tokens > 1 for s in order) + self._admissible()
        for seq in order:
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this step
                continue
            is_prefill = seq.num_pending_tokens > 1
            n = min(seq.num_pending_tokens, self._share(budget, prefills_left) if is_prefill else budget)
            prefills_left -= is_prefill
            if not self._make_room(seq, n, scheduled, preempted):
                continue
            self.allocator.allocate(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        cached = 0
        inflight = self._inflight_names()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = next((s for s in self.waiting if not self._waits_for(s, inflight)), None)
            if seq is None:
                break
            hit = self.allocator.match_prefix(seq)
            n = min(seq.num_pending_tokens, self._share(budget, prefills_left))
            if not self.allocator.can_allocate(seq, n):
                self.allocator.release(seq)
                seq.num_computed_tokens = 0
                break
            seq.num_cached_prompt_tokens = min(hit, seq.num_prompt_tokens)
            cached += seq.num_cached_prompt_tokens
            prefills_left -= 1
            self.waiting.remove(seq)
            inflight.update(seq.block_hashes[seq.num_registered_blocks:])
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.allocator.allocate(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        self._top_up(chunks, budget)
        return SchedulerOutput(chunks, preempted, cached)

    def _inflight_names(self) -> set[bytes]:
        """Names of the prompt blocks that running sequences are computing now (prefix caching)."""
        if not self.allocator.caching or not self.waiting:
            return set()
        return {h for s in self.running if s.num_pending_tokens > 1 for h in s.block_hashes[s.num_registered_blocks:]}

    def _waits_for(self, seq: Sequence, inflight: set[bytes]) -> bool:
        """The first block of `seq` missing from the cache is one a running sequence is computing: admitting it
        later shares that block instead of computing it twice (concurrent questions about one document)."""
        if not inflight:
            return False
        missing = next((h for h in self.allocator.lookup(seq) if h not in self.allocator.cached), None)
        return missing in inflight

    def _admissible(self) -> int:
        return max(0, min(len(self.waiting), self.config.max_num_seqs - len(self.running)))

    @staticmethod
    def _share(budget: int, prefills_left: int) -> int:
        """A prefill's fair share of what is left: a long prompt cannot hold back the ones queued behind it."""
        return max(1, budget // max(1, prefills_left))

    def _make_room(self, seq: Sequence, n: int, scheduled: set[int], preempted: list[Sequence]) -> bool:
        """Preempt the most recently admitted unscheduled sequences until `seq` fits; False if `seq` itself went."""
        while not self.allocator.can_allocate(seq, n):
            victim = [s for s in self.running if s.seq_id not in scheduled][-1]  # `seq` is always a candidate
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _top_up(self, chunks: list[ScheduledChunk], budget: int) -> None:
        """Budget a fair share left unused (a short prompt took less than its share) goes to the prefills."""
        for chunk in chunks:
            if budget == 0:
                return
            extra = min(chunk.seq.num_pending_tokens - chunk.num_tokens, budget)
            if extra > 0 and self.allocator.can_allocate(chunk.seq, chunk.num_tokens + extra):
                self.allocator.allocate(chunk.seq, chunk.num_tokens + extra)
                chunk.num_tokens += extra
                budget -= extra

    def _preempt(self, seq: Sequence) -> None:
        logger.info("KV cache full: preempting request %s (recomputed later)", seq.request_id)
        self.running.remove(seq)
        self.allocator.release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted) and free its KV blocks."""
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq)
