"""Vertical-slash index estimation (MInference, DESIGN.md 3.2), per head, from a chunk's last queries.

1. A = softmax over all keys of the last `last_q` queries' scores (fp32), causal in the last-queries corner.
2. Vertical score of key j: sum_r A[r, j]; the first `sink` keys are always kept; the top v = max(vertical_size,
   sink) keys are the verticals.
3. Slash score of diagonal offset d: sum_r A[r, pos_r - d]; the `local` nearest diagonals are always kept;
   the top s = max(slash_size, 50) offsets are the slashes.
A query at position p then attends keys {verticals <= p} and {p - d for each slash offset d, d <= p}.
vertical_slash_mask() writes that set out as a dense mask: the tests' oracle and the reference path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SINK_KEYS = 30  # first keys always kept
LOCAL_DIAGONALS = 100  # nearest diagonals always kept
MIN_SLASHES = 50


@dataclass(slots=True)
class VerticalSlash:
    verticals: torch.Tensor  # [H, v] key indices, sorted
    slashes: torch.Tensor  # [H, s] diagonal offsets (>= 0), sorted


def attention_probs(q_last: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    # q_last: [r, H, D] rotated queries at key-index positions q_pos [r]; k: [Hkv, m, D] -> A: [H, r, m] fp32
    r, h, d = q_last.shape
    hkv, m, _ = k.shape
    qg = q_last.float().view(r, hkv, h // hkv, d)
    scores = torch.einsum("rkgd,kmd->kgrm", qg, k.float()).reshape(h, r, m) * scale
    future = torch.arange(m)[None, :] > q_pos[:, None]  # [r, m]: keys after each query
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def estimate_vertical_slash(q_last: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float,
                            vertical_size: torch.Tensor | int, slash_size: torch.Tensor | int) -> VerticalSlash:
    """Per-head budgets may differ (tensors [H]); the result is padded to the largest budget by repeating
    the last chosen index, which changes no mask."""
    probs = attention_probs(q_last, k, q_pos, scale)  # [H, r, m]
    h, r, m = probs.shape
    vertical = probs.sum(1)  # [H, m]
    vertical[:, :SINK_KEYS] = float("inf")
    offsets = q_pos[:, None] - torch.arange(m)[None, :]  # [r, m]: diagonal offset of each (query, key)
    valid = offsets >= 0
    slash = torch.zeros(h, m, dtype=torch.float32)
    slash.scatter_add_(1, offsets.clamp(min=0).reshape(1, -1).expand(h, -1),
                       (probs * valid).reshape(h, -1))
    slash[:, :LOCAL_DIAGONALS] = float("inf")
    return VerticalSlash(_top(vertical, vertical_size, SINK_KEYS, h), _top(slash, slash_size, MIN_SLASHES, h))


def _top(score: torch.Tensor, size: torch.Tensor | int, minimum: int, h: int) -> torch.Tensor:
    # score: [H, m] -> [H, k] sorted indices of each head's top max(size_h, minimum) (at most m)
    sizes = torch.as_tensor(size).expand(h).clamp(min=minimum).clamp(max=score.shape[1])
    k = int(sizes.max())
    idx = torch.topk(score, k, dim=-1).indices  # [H, k], best first
    # heads with a smaller budget: repeat their last wanted index into the padding
    pad = torch.arange(k)[None, :] >= sizes[:, None]
    idx = torch.where(pad, idx.gather(1, (sizes - 1)[:, None]).expand(-1, k), idx)
    return idx.sort(dim=-1).values


def vertical_slash_mask(vs: VerticalSlash, q_pos: torch.Tensor, m: int) -> torch.Tensor:
    """[H, n, m] bool: what each head's query at q_pos[i] attends (causal)."""
    h = vs.verticals.shape[0]
    n = q_pos.shape[0]
    keys = torch.arange(m)
    mask = torch.zeros(h, n, m, dtype=torch.bool)
    mask |= torch.zeros(h, m, dtype=torch.bool).scatter(1, vs.verticals, True)[:, None, :]
    diag = q_pos[None, :, None] - keys[None, None, :]  # [1, n, m]
    mask |= (diag[..., None] == vs.slashes[:, None, None, :]).any(-1)
    return mask & (keys[None, None, :] <= q_pos[None, :, None])
