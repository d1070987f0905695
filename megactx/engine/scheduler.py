"""Scheduler: decides, each step, how many tokens of which sequences to compute. Integers only.

There is no prefill phase and no decode phase (vLLM v1's model): every sequence has num_computed_tokens
catching up with its num_tokens. A step has a budget of max_num_batched_tokens; running sequences are served
first (a decode costs one token, so streams keep moving while a long prompt is prefilled in chunks), and the
rest of the budget goes to waiting sequences. When KV blocks run out, the most recently admitted running
sequence is preempted: its blocks are freed and it is recomputed later (never dropped).
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
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending_tokens, budget)
            while not self.allocator.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break
            self.allocator.allocate(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.num_pending_tokens, budget)
            if not self.allocator.can_allocate(seq, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.allocator.allocate(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return SchedulerOutput(chunks, preempted)

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
