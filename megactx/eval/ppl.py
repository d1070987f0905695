"""Long-document perplexity per position bucket, the DCA paper's own measure.

The document is scored by chunked prefill (engine.iter_logits), so full-length logits never exist: each chunk's
logits are reduced to per-token negative log-likelihoods right away. With a window W, tokens are scored by
sliding windows of W tokens with stride W/2 (every token sees between W/2 and W tokens of context): with W = the
trained length the model never leaves its trained range, the reference for the same tokens.
With no text given, the document is the concatenated source of the running Python's standard library.
"""
from __future__ import annotations

import logging
import math
import os
import sysconfig
from typing import Callable, Iterator

import torch

from megactx.errors import MegactxError

logger = logging.getLogger(__name__)


def stdlib_text(min_chars: int) -> str:
    """The standard library's .py files in sorted order, each under a '# file: NAME' line, until min_chars."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            parts.append(f"# file: {os.path.relpath(path, root)}\n{text}\n")
            total += len(parts[-1])
            if total >= min_chars:
                return "".join(parts)
    return "".join(parts)


def document_ids(tokenizer, length: int, text_file: str | None = None) -> list[int]:
    """The first `length` tokens of the document (positions 1..length-1 are scored)."""
    need = length
    if text_file:
        try:
            with open(text_file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise MegactxError(f"{text_file}: cannot read the text file ({e.strerror})") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        chars = need * 4
        while True:
            ids = tokenizer.encode(stdlib_text(chars), add_special_tokens=False)
            if len(ids) >= need or chars > 400_000_000:
                break
            chars *= 2
    if len(ids) < need:
        raise MegactxError(f"the document has {len(ids)} tokens, fewer than --length {length}")
    return ids[:need]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits: [n, V], targets: [n] -> negative log-likelihood [n] (fp64 for the sums)
    return (torch.logsumexp(logits.float(), -1) - logits.float().gather(1, targets[:, None])[:, 0]).double()


def nll_full(engine, ids: list[int], chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first target position, NLLs) per chunk: target t is predicted from all of ids[:t]."""
    targets = torch.tensor(ids)
    for start, logits in engine.iter_logits(ids[:-1], chunk):
        n = logits.shape[0]
        yield start + 1, token_nll(logits, targets[start + 1:start + 1 + n])


def nll_window(engine, ids: list[int], window: int, chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Sliding windows of `window` tokens, stride window / 2: each target sees at most `window` tokens."""
    if window < 2:
        raise MegactxError("--window must be at least 2 tokens")
    stride = window // 2
    targets = torch.tensor(ids)
    total = len(ids) - 1  # targets are positions 1..total
    scored = 0
    while scored < total:
        end = min(total, scored + stride if scored else window)  # score targets (scored, end]
        begin = max(0, end - window)
        nlls = []
        for start, logits in engine.iter_logits(ids[begin:end], chunk):
            pos = begin + start + 1  # target position of the chunk's first row
            keep = max(0, scored + 1 - pos)
            if keep < logits.shape[0]:
                nlls.append(token_nll(logits[keep:], targets[pos + keep:pos + logits.shape[0]]))
        yield scored + 1, torch.cat(nlls)
        scored = end


def perplexity_by_bucket(engine, ids: list[int], bucket: int, window: int | None = None, chunk: int | None = None,
                         on_progress: Callable[[int], None] | None = None) -> list[dict]:
    """Rows {start, end, tokens, nll, ppl} per bucket of target positions [start, end)."""
    sums: dict[int, list[float]] = {}
    stream = nll_full(engine, ids, chunk) if window is None else nll_window(engine, ids, window, chunk)
    for first, nll in stream:
        pos = torch.arange(first, first + nll.shape[0])
        for b in torch.unique(pos // bucket).tolist():
            sel = nll[(pos // bucket) == b]
            acc = sums.setdefault(b, [0.0, 0])
            acc[0] += float(sel.sum())
            acc[1] += int(sel.numel())
        if on_progress:
            on_progress(int(nll.shape[0]))
    rows = []
    for b in sorted(sums):
        total, count = sums[b]
        rows.append({"start": b * bucket, "end": min((b + 1) * bucket, len(ids)), "tokens": count,
                     "nll": total / count, "ppl": math.exp(total / count)})
    return rows
