"""Vertical-slash index estimation (MInference, arXiv 2407.02490), per head, from a chunk's last queries.

1. A = softmax over all keys of the last `last_q` queries' scores (fp32), causal in the last-queries corner.
2. Vertical score of key j: sum_r A[r, j]; the first `sink` keys are always kept; the top v = max(vertical_size,
   sink) keys are the verticals.
3. Slash score of diagonal offset d: sum_r A[r, pos_r - d]; the `local` nearest diagonals are always kept;
   the top s = max(slash_size, 50) offsets are the slashes.
A query at position p then attends keys {verticals <= p} and {p - d for each slash offset d, d <= p}.
Optional mass cut-off (`mass`, FlexPrefill's cumulative-attention rule applied to each list): a head keeps, of its
budget, only the best-scored indices that reach `mass` of its total vertical (or slash) score, never fewer than
the minimum. A budget is then an upper bound: a head whose attention is concentrated computes far fewer pairs.
Under Dual Chunk Attention the keys fall in segments scored with different query rotations (the "critical",
continuous positions p % L + L and p % L + chunk_size): attention_probs() takes one rotated query set per key segment.
vertical_slash_mask() writes the chosen set out as a dense mask: the tests' oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SINK_KEYS = 30  # first keys always kept
LOCAL_DIAGONALS = 100  # nearest diagonals always kept
MIN_SLASHES = 50
# probabilities held at once while estimating (32 MB of fp32): heads per pass. Measured on synthetic inputs
# (14 heads, 64 queries), a whole estimate at 64K-128K keys took 25-33 % less time than with 1 << 25 (128 MB):
# the softmax makes several passes over the buffer, and a smaller one is still in the caches at the next pass
PASS_ELEMENTS = 1 << 23


class Workspace:
    """Grow-only fp32 buffers kept across estimates (SparsePrefill holds one), one per use: the probabilities,
    and the fp32 copy of bf16 keys. A fresh buffer per estimate pays its allocation and first-touch page faults
    every time: measured, a fresh [heads, r, m] buffer made the whole estimate 5-13 % slower at 64K-128K keys,
    and with bf16 keys the kept copy (with the one-pass softmax) made it 9-19 % faster at 64K-128K keys where
    fp32 keys gained 5 %. The keys' buffer holds 2 x keys x head_dim floats (32 MB at 64K keys here)."""

    def __init__(self):
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], device, name: str = "probs") -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < numel or flat.device != torch.device(device):
            flat = self._flat[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return flat[:numel].view(shape)


def _probs_buffer(workspace: Workspace | None, shape: tuple[int, ...], device) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return workspace.get(shape, device)


def _fp32_keys(k: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """Scores are computed in fp32: bf16 keys are converted once per estimate (not in every pass of heads),
    into the workspace's buffer when there is one."""
    if k.dtype == torch.float32:
        return k
    if workspace is None:
        return k.float()
    return workspace.get(tuple(k.shape), k.device, name="keys").copy_(k)


@dataclass(slots=True)
class VerticalSlash:
    verticals: torch.Tensor  # [H, v] key indices, sorted
    slashes: torch.Tensor  # [H, s] diagonal offsets (>= 0), sorted


def attention_probs(segments: list[tuple[int, int, torch.Tensor]], k: torch.Tensor, q_pos: torch.Tensor,
                    scale: float, heads: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """segments: (lo, hi, q_last [r, H, D]) -- keys [lo, hi) are scored with these rotated queries; together they
    cover [0, m). k: [Hkv, m, D], q_pos: [r] key indices of the queries, heads: sorted query heads to score (default
    all), out: a contiguous fp32 buffer of the result's shape to reuse -> A: [len(heads), r, m] fp32, causal."""
    hkv, m, d = k.shape
    r, h, _ = segments[0][2].shape
    g = h // hkv
    heads = torch.arange(h) if heads is None else heads.cpu()
    scores = torch.empty(len(heads), r, m, dtype=torch.float32, device=k.device) if out is None else out
    # heads sorted: those of KV head j are the contiguous rows bounds[j]:bounds[j + 1]
    bounds = torch.searchsorted(heads, torch.arange(hkv + 1) * g).tolist()
    for j in range(hkv):
        a, b = bounds[j], bounds[j + 1]
        if b == a:
            continue
        kj = k[j].float()  # scores are computed in fp32; bf16 keys converted once for all segments
        for lo, hi, q in segments:
            if hi > lo:
                qj = q[:, heads[a:b].to(q.device)].float().transpose(0, 1).reshape((b - a) * r, d)
                # scale * q k^T written straight into the columns [lo, hi) of the score rows: no temporary
                scores[a:b].view((b - a) * r, m)[:, lo:hi].addmm_(qj, kj[lo:hi].t(), beta=0, alpha=scale)
    first = int(q_pos.min()) + 1  # keys before this one are visible to every query
    if first < m:
        future = torch.arange(first, m, device=k.device)[None, :] > q_pos[:, None]  # [r, m - first]
        scores[..., first:].masked_fill_(future, float("-inf"))
    # softmax in place: a second [heads, r, m] tensor would cost its allocation and first-touch page faults.
    # On a CPU ATen's softmax kernel takes one row at a time (max, exp and sum, scale: each element read, then
    # written at its own place, so out may be the input) while the row is in the cache: 2.9 ms instead of 4.3
    # for the five whole-buffer passes below on 32 MB (measured, 2 threads); elsewhere the five passes
    if scores.device.type == "cpu":
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


def slash_scores(probs: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """[H, r, m] probabilities of queries at increasing positions q_pos -> [H, m] score of each diagonal offset
    d = pos_i - j. In a run of consecutive queries, row i's element j + i is offset p0 - j for every row: read
    with a row stride of m + 1, each diagonal is a column of a view (no copy), then a column sum. The few
    offsets beyond p0 that only later rows reach are gathered separately. (Keys after a query have probability
    0: their negative offsets are dropped.)"""
    h, r, m = probs.shape
    if r > 1 and not bool((q_pos.diff() == 1).all()):
        # queries in several runs of consecutive positions (spread over a piece): each run's diagonals, summed
        breaks = (torch.nonzero(q_pos.diff() != 1).flatten() + 1).tolist()
        return sum(slash_scores(probs[:, a:b], q_pos[a:b]) for a, b in zip([0] + breaks, breaks + [r]))
    p0, p_last = int(q_pos[0]), int(q_pos[-1])
    probs = probs.contiguous()
    out = torch.zeros(h, m, dtype=probs.dtype, device=probs.device)
    width = min(p0 + 1, m - r + 1)  # offsets p0 - width + 1 .. p0, every row inside [0, m)
    diagonals = probs.as_strided((h, r, width), (r * m, m + 1, 1)).sum(1)  # [H, width]: column c is offset p0 - c
    out[:, p0 - width + 1:p0 + 1] = diagonals.flip(-1)
    i = torch.arange(r, device=probs.device)[:, None]
    d = torch.arange(p0 + 1, p_last + 1, device=probs.device)[None, :]  # offsets only rows i >= d - p0 reach
    j = p0 + i - d
    ok = (j >= 0) & (j < m)
    out.index_add_(1, d.expand_as(j)[ok], probs[:, i.expand_as(j)[ok], j[ok]])
    return out


def estimate_vertical_slash(q_last: torch.Tensor | list, k: torch.Tensor, q_pos: torch.Tensor, scale: float,
                            vertical_size: torch.Tensor | int, slash_size: torch.Tensor | int,
                            mass: float | None = None, heads: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> VerticalSlash:
    """q_last: rotated queries [r, H, D] (or DCA segments, see attention_probs). Per-head budgets may differ
    (tensors [H]); the result is padded to the largest budget by repeating a chosen index, which changes no mask.
    heads: only these (sorted) query heads are estimated, budgets given for them; the result has len(heads) rows
    (a layer whose other heads are A-shape or block-sparse does not pay for them)."""
    m = k.shape[1]
    k = _fp32_keys(k, workspace)
    segments = q_last if isinstance(q_last, list) else [(0, m, q_last)]
    r = segments[0][2].shape[0]
    heads = torch.arange(segments[0][2].shape[1]) if heads is None else heads.cpu()
    h = len(heads)
    # a few heads at a time through one reused buffer: its size stays bounded (one head's probabilities at 1M
    # keys are 256 MB) and it is allocated, and its pages touched, once per call instead of once per head
    per_pass = max(1, min(h, PASS_ELEMENTS // (r * m)))
    buffer = _probs_buffer(workspace, (per_pass, r, m), k.device)
    vertical = torch.empty(h, m, dtype=torch.float32, device=k.device)
    slash = torch.empty(h, m, dtype=torch.float32, device=k.device)
    for i in range(0, h, per_pass):
        sel = heads[i:i + per_pass]
        probs = attention_probs(segments, k, q_pos, scale, sel, out=buffer[:len(sel)])  # [len(sel), r, m]
        vertical[i:i + len(sel)] = probs.sum(1)
        slash[i:i + len(sel)] = slash_scores(probs, q_pos)
    del buffer
    cut = mass is not None and mass < 1.0  # the raw scores are kept (copied) only for the cut-off
    vertical_raw = vertical.clone() if cut else None
    vertical[:, :SINK_KEYS] = float("inf")
    verticals = _top(vertical, vertical_size, SINK_KEYS, h, vertical_raw, mass)
    slash_raw = slash.clone() if cut else None
    slash[:, :LOCAL_DIAGONALS] = float("inf")
    slash[:, int(q_pos[-1]) + 1:] = float("-inf")  # offsets no query reaches
    return VerticalSlash(verticals, _top(slash, slash_size, MIN_SLASHES, h, slash_raw, mass, kept=LOCAL_DIAGONALS))


def _top(score: torch.Tensor, size: torch.Tensor | int, minimum: int, h: int, raw: torch.Tensor | None = None,
         mass: float | None = None, kept: int = 0) -> torch.Tensor:
    # score: [H, m] -> [H, k] sorted indices of each head's top max(size_h, minimum) (at most m); with raw scores
    # (the cut-off), each head's count is cut to the fewest best indices whose raw scores reach mass * its total
    # never below the `kept` always-kept ones (scored inf,
    # they tie: a cut among them would keep an arbitrary few) unless the budget is smaller
    sizes = torch.as_tensor(size).expand(h).clamp(min=minimum).clamp(max=score.shape[1])
    k = int(sizes.max())
    idx = torch.topk(score, k, dim=-1).indices  # [H, k], best first
    if raw is not None:
        cum = raw.gather(1, idx).cumsum(-1)  # [H, k]: raw score covered by the best j + 1 indices
        goal = mass * raw.sum(-1, keepdim=True)
        needed = (cum < goal).sum(-1) + 1  # [H]
        sizes = torch.minimum(sizes.to(needed.device), needed.clamp(min=max(minimum, kept))).cpu()
    # heads with a smaller budget: repeat their last wanted index into the padding
    pad = torch.arange(k, device=score.device)[None, :] >= sizes[:, None].to(score.device)
    idx = torch.where(pad, idx.gather(1, (sizes.to(score.device) - 1)[:, None]).expand(-1, k), idx)
    return idx.sort(dim=-1).values


def vertical_slash_mask(vs: VerticalSlash, q_pos: torch.Tensor, m: int) -> torch.Tensor:
    """[H, n, m] bool: what each head's query at q_pos[i] attends (causal)."""
    h = vs.verticals.shape[0]
    keys = torch.arange(m)
    mask = torch.zeros(h, q_pos.shape[0], m, dtype=torch.bool)
    mask |= torch.zeros(h, m, dtype=torch.bool).scatter(1, vs.verticals, True)[:, None, :]
    diag = q_pos[None, :, None] - keys[None, None, :]  # [1, n, m]
    mask |= (diag[..., None] == vs.slashes[:, None, None, :]).any(-1)
    return mask & (keys[None, None, :] <= q_pos[None, :, None])
