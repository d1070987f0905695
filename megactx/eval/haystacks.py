"""Haystacks beyond RULER's, for needle tasks whose filler looks like what users send: source code, log lines,
and prose full of the needle's own words. Each takes a number of lines and a random.Random and returns the lines;
the needle sentences are inserted between them like RULER's noise lines.
"""
from __future__ import annotations

import random

from megactx.eval.words import ADJECTIVES, NOUNS

LEVELS = ["INFO"] * 6 + ["DEBUG"] * 3 + ["WARN", "ERROR"]
ACTIONS = ["update", "compute", "load", "merge", "count", "scale", "check", "render", "parse", "sort"]
SERVICES = ["api", "worker", "scheduler", "cache", "auth", "billing", "search", "gateway"]


def code_lines(size: int, rng: random.Random) -> list[str]:
    """Python: small functions of arithmetic on named values, with comments and numbers everywhere."""
    lines: list[str] = []
    while len(lines) < size:
        verb, noun = rng.choice(ACTIONS), rng.choice(NOUNS)
        lines.append(f"def {verb}_{noun}(count, limit={rng.randint(2, 999)}):")
        lines.append(f'    """{verb.capitalize()} the {rng.choice(ADJECTIVES)} {noun}s, at most the limit."""')
        for _ in range(rng.randint(1, 4)):
            name = f"{rng.choice(ADJECTIVES)}_{rng.choice(NOUNS)}"
            lines.append(f"    {name} = count * {rng.randint(2, 97)} + {rng.randint(0, 9999)}  # {rng.choice(NOUNS)}")
        lines.append(f"    return min({name}, limit) % {rng.randint(3, 31)}")
        lines.append("")
    return lines[:size]


def log_lines(size: int, rng: random.Random) -> list[str]:
    """Service logs: timestamps, levels, request ids and durations, numbers of every length."""
    out = []
    for i in range(size):
        t = i * 7 + rng.randint(0, 6)
        service = f"{rng.choice(SERVICES)}-{rng.randint(1, 24)}"
        what = rng.choice([f"request {rng.randint(1000, 999999)} served in {rng.randint(1, 900)} ms",
                           f"cache miss for key {rng.choice(NOUNS)}:{rng.randint(1, 99999)}",
                           f"retrying job {rng.randint(100, 9999)} (attempt {rng.randint(1, 5)})",
                           f"connected to {rng.choice(NOUNS)}.internal:{rng.randint(1024, 65535)}",
                           f"queue depth {rng.randint(0, 5000)}, lag {rng.randint(0, 90000)} ms"])
        out.append(f"2026-03-{1 + t // 86400 % 28:02d}T{t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z "
                   f"{rng.choice(LEVELS)} {service} {what}")
    return out


def similar_lines(size: int, rng: random.Random) -> list[str]:
    """Prose built from the needle's own words ("special", "magic", "number", adjective-noun keys), so that
    nothing but the exact key tells the needle apart."""
    forms = ["The special {noun} of the {adj} {noun2} is not a magic number.",
             "Some say the magic {noun} for {adj}-{noun2} is special, but nobody wrote it down.",
             "A special magic {noun} was hidden near the {adj} {noun2}, or so the story goes.",
             "Numbers about the {adj}-{noun2} are special only to the {noun}."]
    return [rng.choice(forms).format(noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS), adj=rng.choice(ADJECTIVES))
            for _ in range(size)]


HAYSTACKS = {"code": code_lines, "logs": log_lines, "similar": similar_lines}
