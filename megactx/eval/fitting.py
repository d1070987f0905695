"""Sizing a haystack so that the rendered prompt has a requested number of tokens in the target's tokenizer."""
from __future__ import annotations

from typing import Callable

from megactx.errors import MegactxError


def largest_fitting(tokens_for: Callable[[int], int], target: int, guess: int | None = None) -> int:
    """The largest n >= 0 with tokens_for(n) <= target, for tokens_for increasing in n.

    A secant estimate from two probes lands within a few units; bisection finishes the bracket. Each probe
    tokenizes a whole prompt (or asks a server to), so the number of probes is what matters: about 6-10.
    """
    base = tokens_for(0)
    if base > target:
        raise MegactxError(f"the prompt without any haystack is already {base} tokens, more than the "
                           f"requested {target}: ask for a longer length")
    probe = guess if guess and guess > 0 else 64
    probe_tokens = tokens_for(probe)
    per_unit = max((probe_tokens - base) / probe, 1e-6)
    lo, hi = (probe, None) if probe_tokens <= target else (0, probe)
    estimate = int((target - base) / per_unit)
    for _ in range(6):  # secant steps until the answer is bracketed tightly
        if hi is not None and hi - lo <= 8:
            break
        n = max(lo + 1, estimate if hi is None else min(estimate, hi - 1))
        if n == probe:
            n += 1
        t = tokens_for(n)
        if t <= target:
            lo = n
            estimate = n + max(1, int((target - t) / per_unit))
        else:
            hi = n
            estimate = n - max(1, int((t - target) / per_unit))
        probe = n
    if hi is None:  # never overshot: grow until we do
        step = max(1, lo // 8)
        while tokens_for(lo + step) <= target:
            lo += step
            step *= 2
        hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens_for(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo
