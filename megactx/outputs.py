"""What the engine returns: one RequestOutput per request, one CompletionOutput per choice (n)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megactx.sampling import SampledToken


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[SampledToken] | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from a cache rather than computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    usage: Usage
    # arrival, first_token_time (time.monotonic); prefill_done: prompt tokens ready; prefill_mark: (time, tokens
    # ready) after the request's first step, the start of prefill_rate's measurement
    metrics: dict = field(default_factory=dict)
    # [None, SampledToken of prompt token 1, ...] (its logprob given the tokens before it) when asked for
    prompt_logprobs: list[SampledToken | None] | None = None

    # conveniences for the common n == 1 case
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def prefill_rate(out: RequestOutput, now: float | None = None) -> tuple[float, float] | None:
    """(prompt tokens computed per second, seconds left) of a prefill in progress, measured from the end of its
    first step (None before a second step has run or once the prompt is done)."""
    import time
    mark, done = out.metrics.get("prefill_mark"), out.metrics.get("prefill_done", 0)
    total = len(out.prompt_token_ids)
    if mark is None or done <= mark[1] or done >= total:
        return None
    elapsed = (time.monotonic() if now is None else now) - mark[0]
    rate = (done - mark[1]) / max(elapsed, 1e-9)
    return rate, (total - done) / rate
