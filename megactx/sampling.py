"""Sampling parameters and the sampler (logits processors + token choice).

Order, as in vLLM / transformers: logit_bias and penalties on the raw logits, then temperature, top-k, top-p,
min-p, and a draw from the resulting distribution with the request's own torch.Generator (so a seeded request
samples the same tokens alone or in any batch). A temperature below
GREEDY_BELOW is greedy (as in vLLM: dividing by 1e-45 overflows). Every accepted value stays finite: a penalty
that overflows a logit makes it the largest finite one, so a request can never produce NaN probabilities; and
sample() fails only the row whose sampling raised, never its batch. Logprobs are those of the raw model
distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megactx.errors import RequestError

GREEDY_BELOW = 1e-5
GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """A constraint on the output (engine/guided.py compiles it): a JSON schema (dict), any JSON object, a regex,
    one of a list of strings, or a Lark grammar. source: the request field it came from, for error messages."""
    kind: str
    spec: object = None
    source: str = "guided decoding"

    def __post_init__(self):
        if self.kind not in GUIDED_KINDS:
            raise RequestError(f"{self.source}: unknown constraint {self.kind!r}; choose one of {', '.join(GUIDED_KINDS)}")
        if self.kind == "choice" and not (isinstance(self.spec, list) and self.spec
                                          and all(isinstance(c, str) and c for c in self.spec)):
            raise RequestError(f"{self.source}: give a non-empty list of non-empty strings")
        if self.kind in ("regex", "grammar") and not (isinstance(self.spec, str) and self.spec):
            raise RequestError(f"{self.source}: give the {self.kind} as a non-empty string")
        if self.kind == "json_schema" and not isinstance(self.spec, dict):
            raise RequestError(f"{self.source}: a JSON schema is an object")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None = up to the context length; 0 = none (with prompt_logprobs: score only)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' rule, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's rule, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = off; k >= 0: chosen token's logprob and the top k
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    prompt_logprobs: int | None = None  # None = off; k >= 0: each prompt token's logprob and rank, and the top k
    guided: GuidedDecoding | None = None  # structured output: the engine masks what would break the constraint

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be in [-2**63, 2**64 - 1], got {self.seed}"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    rank: int | None = None  # 1 = the most likely token (prompt logprobs)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    # logits: [V] (modified in place)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits: [V] already divided by the temperature -> [V] with excluded tokens at -inf
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the smallest set reaching top_p
        drop[0] = False  # and always the most likely token (a top_p below fp32's range, 1e-300, is 0 there)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    # logits: [V] (modified in place); ids outside the vocabulary were refused with the request
    if bias:
        logits[torch.tensor(list(bias), dtype=torch.long)] += torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits


def finite(logits: torch.Tensor) -> torch.Tensor:
    """+inf (a penalty of 1e-300, a tiny temperature) -> the largest finite value; NaN -> -inf (never chosen)."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def sample_one(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
               generator: torch.Generator | None, allowed: torch.Tensor | None = None) -> SampledToken:
    # logits: [V] fp32, raw from the model; allowed: [V] bool, a grammar's mask (-inf stays -inf below)
    raw = logits
    logits = logits.clone()
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    logits = finite(apply_penalties(apply_logit_bias(logits, params.logit_bias), params, prompt_ids, output_ids))
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        logits = filter_logits(finite(logits / params.temperature), params)
        probs = torch.softmax(logits, -1)
        # the exponential race (as vLLM samples): argmax p_i / q_i with q_i ~ Exp(1) draws i with probability p_i.
        # Unlike inverse-CDF draws (torch.multinomial), a seeded draw does not move when batching changes the
        # logits in their last bits: only a near-tie between the two best racers could flip
        q = torch.empty_like(probs).exponential_(1.0, generator=generator)
        token = int(torch.argmax(probs / q))
    if params.logprobs is None:
        return SampledToken(token)
    logprobs = torch.log_softmax(raw, -1)
    top = []
    if params.logprobs > 0:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return SampledToken(token, float(logprobs[token]), top)


def sample(logits: torch.Tensor, seqs) -> list[SampledToken | Exception]:
    """One token per row; seqs[i] carries .params, .prompt_token_ids, .output_token_ids, .generator and .guide
    (None, or what engine/guided.py builds: .allowed(V) -> [V] bool). A row whose sampling raises gets its
    exception in its place: it fails that request only."""
    # logits: [B, V]
    out = []
    for i, s in enumerate(seqs):
        try:
            allowed = s.guide.allowed(logits.shape[-1]) if s.guide is not None else None
            out.append(sample_one(logits[i], s.params, s.prompt_token_ids, s.output_token_ids, s.generator, allowed))
        except Exception as e:  # noqa: BLE001 -- reported to that request, the batch goes on
            out.append(e)
    return out
