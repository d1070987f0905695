"""Logprobs of the prompt's own tokens (lm-eval's loglikelihood, vLLM's prompt_logprobs), computed per chunk.

The hidden states of a prefill chunk at positions [c, c + n) give the distributions of the tokens at c + 1 ...
c + n. They are turned into logits at most `max_rows` rows at a time, and only each row's logprob, rank and top k
are kept: a full vocabulary x prompt length tensor never exists (152K x 64K fp32 would be 40 GB).
"""
from __future__ import annotations

import torch

from megactx.sampling import SampledToken


def score_prompt_tokens(chunks, hidden: torch.Tensor, logits_of, max_rows: int) -> None:
    """For each chunk whose sequence asks for prompt logprobs (params.prompt_logprobs = k), append to
    seq.prompt_logprobs the entries of the prompt tokens this chunk's rows predict. hidden: [T, hidden] rows of the
    step in chunk order; logits_of(rows) -> [r, vocab]."""
    row = 0
    for ch in chunks:
        seq, n = ch.seq, ch.num_tokens
        k = seq.params.prompt_logprobs
        if k is not None and seq.index == 0:  # the n choices of a request share one prompt
            c = seq.num_computed_tokens
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]  # the first token has no context
            lo = max(c, len(seq.prompt_logprobs) - 1)  # after a preemption, positions already scored are skipped
            hi = min(c + n, seq.num_prompt_tokens - 1)
            for a in range(lo, hi, max_rows):
                b = min(a + max_rows, hi)
                seq.prompt_logprobs.extend(
                    score_rows(logits_of(hidden[row + a - c:row + b - c]), seq.token_ids[a + 1:b + 1], k))
        row += n


def score_rows(logits: torch.Tensor, targets: list[int], k: int) -> list[SampledToken]:
    # logits: [r, V], targets: the r tokens that follow -> their logprob, rank (1 = most likely) and the top k
    logprobs = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, target)  # [r, 1]
    ranks = (logprobs > chosen).sum(-1) + 1
    top_v, top_i = torch.topk(logprobs, k) if k else (None, None)
    out = []
    for j, t in enumerate(targets):
        top = list(zip(top_i[j].tolist(), top_v[j].tolist())) if k else []
        out.append(SampledToken(t, float(chosen[j, 0]), top, int(ranks[j])))
    return out
