"""A sequence: one completion being generated. The only progress counter is num_computed_tokens, which
catches up with len(token_ids); prefill, chunked prefill, recompute after preemption and decode are one path."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from megactx.sampling import SampledToken, SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # choice index within its request (n > 1)
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    output_text: str = ""
    logprobs: list[SampledToken] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrival: float = 0.0
    first_token_time: float | None = None
    prompt_logprobs: list | None = None  # [None, SampledToken of prompt token 1, ...] when params ask for them
    prefill_mark: tuple[float, int] | None = None  # (time.monotonic(), computed tokens) after its first step
    num_cached_prompt_tokens: int = 0  # prompt tokens taken from a cache instead of computed (last admission)
    block_hashes: list[bytes] = field(default_factory=list)  # names of its full blocks (prefix caching)
    num_registered_blocks: int = 0  # blocks of block_table already named in the prefix cache
    num_preemptions: int = 0
    guide: object | None = None  # the grammar matcher of a constrained request (engine/guided.py)
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
