"""Passkey retrieval with Qwen2.5-1M's prompt (arXiv 2501.15383), scored by Landmark Attention's rule.

One user message through the chat template, greedy, up to 32 new tokens. The filler sentences are sized with
the target's tokenizer so that the rendered prompt has the requested length; the key line goes between whole
filler sentences at the requested depth (0 % = top, 100 % = bottom). Score: the first integer in the answer
equals the key (Landmark Attention's rule); whether the key appears anywhere is recorded too.
Rows are appended to JSONL as they finish, so a run that stops resumes where it was.
"""
from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Callable

from megactx.eval.backends import Backend, Progress
from megactx.eval.fitting import largest_fitting
from megactx.eval.results import ResultLog

logger = logging.getLogger(__name__)

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
SENTENCES = [s + ". " for s in FILLER.strip().rstrip(".").split(". ")]
QUESTION = "\nWhat is the pass key?"
MAX_NEW_TOKENS = 32


def make_key(seed: int, length: int, depth: int, trial: int) -> int:
    """5 digits from a generator seeded by the cell, so every engine is asked the same keys."""
    return random.Random(f"passkey-{seed}-{length}-{depth}-{trial}").randint(10000, 99999)


def build_prompt(num_sentences: int, depth: float, key: int) -> str:
    filler = (SENTENCES * (num_sentences // len(SENTENCES) + 1))[:num_sentences]
    cut = round(num_sentences * depth / 100)
    key_line = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    return INTRO + "".join(filler[:cut]) + key_line + "".join(filler[cut:]) + QUESTION


def first_integer(answer: str) -> int | None:
    match = re.search(r"\d+", answer)
    return int(match.group()) if match else None


def score(answer: str, key: int) -> tuple[bool, bool]:
    """(correct by the first-integer rule, key found as a substring)."""
    return first_integer(answer) == key, str(key) in answer


@dataclass(slots=True)
class Cell:
    length: int
    depth: int
    trial: int


def run_passkey(backend: Backend, lengths: list[int], depths: list[int], trials: int, out_dir: str,
                seed: int = 0, on_row: Callable[[dict | None], None] | None = None,
                on_prefill: Progress | None = None) -> list[dict]:
    """Run every cell not already in out_dir/passkey.jsonl; return all rows (old and new).
    on_row(row) is called after each cell (row None: a cell skipped because it was done)."""
    guess: dict[int, int] = {}
    with ResultLog(os.path.join(out_dir, "passkey.jsonl"), lambda r: (r["length"], r["depth"], r["trial"]),
                   on_row) as log:
        for length in lengths:
            for depth in depths:
                for trial in range(trials):
                    if not log.skip((length, depth, trial)):
                        row = run_cell(backend, Cell(length, depth, trial), seed, guess, on_prefill)
                        log.add({**row, **backend.machine})
    return log.rows


def run_cell(backend: Backend, cell: Cell, seed: int, guess: dict[int, int],
             on_prefill: Progress | None = None) -> dict:
    key = make_key(seed, cell.length, cell.depth, cell.trial)
    target = cell.length
    if backend.max_model_len and target + MAX_NEW_TOKENS > backend.max_model_len:
        # at the context limit itself (e.g. 32K on a 32K model) leave room for the answer
        target = backend.max_model_len - MAX_NEW_TOKENS
        logger.info("passkey length %d: prompt sized to %d tokens, leaving room for the answer", cell.length, target)
    n = largest_fitting(lambda k: backend.count(build_prompt(k, cell.depth, key)), target,
                        guess.get(cell.length))
    guess[cell.length] = n
    ids = backend.render(build_prompt(n, cell.depth, key))
    answer = backend.generate(ids, MAX_NEW_TOKENS, on_prefill)
    correct, found = score(answer.text, key)
    logger.info("passkey length %d depth %d trial %d: %s (%d prompt tokens, TTFT %.1f s)", cell.length,
                cell.depth, cell.trial, "ok" if correct else "wrong", len(ids), answer.ttft_s)
    return {"length": cell.length, "depth": cell.depth, "trial": cell.trial, "key": key, "answer": answer.text,
            "correct": correct, "substring": found, "prompt_tokens": len(ids), "ttft_s": round(answer.ttft_s, 3),
            **answer.stats}


def summarize(rows: list[dict]) -> list[dict]:
    """Per length: accuracy (first integer), substring rate, mean TTFT and prefill speed."""
    table = []
    for length in sorted({r["length"] for r in rows}):
        rs = [r for r in rows if r["length"] == length]
        ttft = sum(r["ttft_s"] for r in rs) / len(rs)
        table.append({"length": length, "cells": len(rs),
                      "accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs),
                      "substring": 100.0 * sum(r["substring"] for r in rs) / len(rs),
                      "mean_ttft_s": round(ttft, 2),
                      "prefill_tok_s": round(sum(r["prompt_tokens"] for r in rs) / len(rs) / max(ttft, 1e-9), 1)})
    return table


def accuracy_grid(rows: list[dict]) -> tuple[list[int], list[int], list[list[float]]]:
    """(lengths, depths, accuracy[depth][length] in %) for the heatmap; NaN where a cell has no rows."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = []
    for d in depths:
        line = []
        for n in lengths:
            cell = [r["correct"] for r in rows if r["length"] == n and r["depth"] == d]
            line.append(100.0 * sum(cell) / len(cell) if cell else float("nan"))
        grid.append(line)
    return lengths, depths, grid
