"""Sparse prefill plans: which earlier keys each head's query block attends (MInference, arXiv 2407.02490).

The queries of a prefill chunk are cut into blocks of `block` rows. Each head's query block [a, b) attends
  its own block [a, b), causal (the kernel computes it densely for all heads at once), and
  a set of earlier keys (< a) chosen for that head and block: its "plan", spans of the cache plus single columns.
A vertical-slash pattern becomes a plan as in MInference's GPU kernel: the slash with offset d covers, for the
block's rows, the key range [a - d, b - d); the union of those ranges (the same relative offsets for every
block) plus the verticals they do not cover. A block computes the whole ranges: a superset of the exact
diagonals, at block granularity. Block-sparse patterns are plans directly.

Block height is a trade: a slash far from the others costs `block` keys per query block instead of one key
per row (the tile that holds a diagonal), while the flash kernel is most efficient on tall blocks. Measured
here (14 heads, 32K keys, one range per block): 256 rows ran at 73-88 % of the dense kernel's speed per
computed pair, 1024 rows at 87-100 %, 128 rows at 59-77 %; 256 is the default.

plan_mask() writes a plan out as a dense [H, n, m] mask from its definition; reference_attention() under that
mask is the tests' oracle for the kernel (kernel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megactx.attention.sparse.estimate import VerticalSlash



@dataclass(slots=True)
class BlockKeys:
    """The earlier keys (all < the block's first position) one head's query block attends."""
    ranges: list[tuple[int, int]]  # disjoint [lo, hi) spans: read as views of the cache, no copy
    columns: torch.Tensor  # [c] single keys outside the spans: gathered

    def indices(self) -> torch.Tensor:
        parts = [torch.arange(lo, hi) for lo, hi in self.ranges] + [self.columns.cpu()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def size(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges) + len(self.columns)


Plan = list[list[BlockKeys]]  # [H][num_blocks]


def block_starts(q_start: int, n: int, block: int) -> list[int]:
    return list(range(q_start, q_start + n, block))


def _runs(sorted_values: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted distinct ints -> maximal runs of consecutive values as (first, last + 1)."""
    if len(sorted_values) == 0:
        return []
    breaks = (sorted_values.diff() != 1).nonzero().flatten() + 1
    starts = torch.cat([torch.tensor([0]), breaks])
    ends = torch.cat([breaks, torch.tensor([len(sorted_values)])])
    return [(int(sorted_values[a]), int(sorted_values[b - 1]) + 1) for a, b in zip(starts, ends)]


MERGE_GAP = 256  # spans closer than this many keys are computed as one: a call costs about as much as 256 keys


def _slash_cover(vs: VerticalSlash, block: int):
    """-> slashes, sorted verticals (duplicates adjacent), max_d, covered [H, max_d + 2] bool: covered[h, u] when
    the key a - u is in some slash's range [a - d, a - d + block) of the block at a, i.e. d - block < u <= d
    (u = 0, the block's own first key, never is: d > 0 only)."""
    h = vs.verticals.shape[0]
    slashes, verticals = vs.slashes.cpu(), vs.verticals.cpu().sort(dim=-1).values
    max_d = max(int(slashes.max()), 0) if slashes.numel() else 0
    real = (slashes > 0).to(torch.int32)
    diff = torch.zeros(h, max_d + 2, dtype=torch.int32)
    diff.scatter_add_(1, (slashes - block).clamp(min=0) + 1, real)
    diff.scatter_add_(1, slashes.clamp(min=0) + 1, -real)
    return slashes, verticals, max_d, diff.cumsum(1) > 0


def vertical_slash_plan(vs: VerticalSlash, q_start: int, n: int, block: int,
                        merge_gap: int = MERGE_GAP) -> Plan:
    """merge_gap: spans separated by fewer keys are joined (a superset: fewer, longer kernel calls).
    It runs for every layer of every prefill part, and was as slow as the estimate itself (40 ms at 24K keys,
    14 heads): the gaps are filled on the runs' ends instead of element by element, and each head's spans and
    columns for all its blocks come from a few whole-tensor ops. reference_vertical_slash_plan() is the oracle."""
    h = vs.verticals.shape[0]
    _, verticals, max_d, covered = _slash_cover(vs, block)
    # as runs [u_lo, u_hi): pad a False before u = 0 (u = max_d + 1 is never covered, every run ends before it)
    edge = torch.nn.functional.pad(covered, (1, 0)).to(torch.int8).diff(dim=1)  # +1 at a run's first u, -1 after
    head_of, u_lo = (edge == 1).nonzero().unbind(1)  # runs in (head, u) order
    u_hi = (edge == -1).nonzero()[:, 1]
    changed = False  # joined runs differ from `covered`: it is rebuilt from them below
    if merge_gap > 0 and len(u_lo) > 1:  # join a run to the next one of its head across a gap under merge_gap
        join = (head_of[1:] == head_of[:-1]) & (u_lo[1:] - u_hi[:-1] < merge_gap)
        changed |= bool(join.any())
        keep_lo = torch.cat([torch.tensor([True]), ~join])
        keep_hi = torch.cat([~join, torch.tensor([True])])
        head_of, u_lo, u_hi = head_of[keep_lo], u_lo[keep_lo], u_hi[keep_hi]
    counts = torch.bincount(head_of, minlength=h).tolist()
    if changed:  # covered again from the final runs (gaps joined): a vertical in a span is not
        diff = torch.zeros(h, max_d + 3, dtype=torch.int32)  # gathered as a column
        diff.index_put_((head_of, u_lo), torch.ones(len(u_lo), dtype=torch.int32), accumulate=True)
        diff.index_put_((head_of, u_hi), torch.full((len(u_hi),), -1, dtype=torch.int32), accumulate=True)
        covered = diff.cumsum(1)[:, :max_d + 2] > 0
    starts = torch.tensor(block_starts(q_start, n, block))  # [B]
    nb = len(starts)
    # a vertical is gathered for a block when it is before the block and no span covers it
    rel = starts[:, None, None] - verticals[None]  # [B, H, V]
    in_span = covered.gather(1, rel.clamp(0, max_d + 1).permute(1, 0, 2).reshape(h, -1)).view(h, nb, -1)
    first = torch.ones_like(verticals, dtype=torch.bool)
    first[:, 1:] = verticals[:, 1:] != verticals[:, :-1]  # the padding repeats an index: keep it once
    free = ((rel > 0) & ((rel > max_d) | ~in_span.transpose(0, 1)) & first[None]).transpose(0, 1)  # [H, B, V]
    columns = verticals[:, None, :].expand(-1, nb, -1)[free].split(free.sum(-1).flatten().tolist())  # H * B
    plan = []
    for head, (lo_u, hi_u) in enumerate(zip(u_lo.split(counts), u_hi.split(counts))):
        # the block at a reads keys [a - u_hi + 1, a - u_lo + 1) of each run with u_lo <= a, ascending in keys
        lo_u, hi_u = lo_u.flip(0), hi_u.flip(0)
        los = (starts[:, None] - hi_u[None, :] + 1).clamp(min=0).tolist()  # [B][R]
        his = (starts[:, None] - lo_u[None, :] + 1).tolist()
        skip = (lo_u[None, :] > starts[:, None]).sum(1).tolist()  # runs beyond the block's start: a prefix
        plan.append([BlockKeys(list(zip(los[i][skip[i]:], his[i][skip[i]:])), columns[head * nb + i])
                     for i in range(nb)])
    return plan


def reference_vertical_slash_plan(vs: VerticalSlash, q_start: int, n: int, block: int,
                                  merge_gap: int = MERGE_GAP) -> Plan:
    """vertical_slash_plan()'s reference: covered offsets, gaps filled element by element, one run list and one
    column selection per head and block. The tests check it pair by pair against the definition and the fast
    path against it."""
    h = vs.verticals.shape[0]
    _, verticals, max_d, covered = _slash_cover(vs, block)
    if merge_gap > 0:  # fill the uncovered gaps shorter than merge_gap between two covered runs
        u = torch.arange(max_d + 2).expand(h, -1)
        prev = torch.where(covered, u, -1).cummax(1).values
        nxt = torch.where(covered, u, max_d + 2).flip(1).cummin(1).values.flip(1)
        covered |= (prev >= 0) & (nxt <= max_d) & (nxt - prev - 1 < merge_gap)
    runs = [_runs(covered[head].nonzero().flatten()) for head in range(h)]  # (u_lo, u_hi): keys (a - u_hi, a - u_lo]
    starts = torch.tensor(block_starts(q_start, n, block))  # [B]
    # a vertical is gathered for a block when it is before the block and no span covers it
    rel = starts[:, None, None] - verticals[None]  # [B, H, V]
    in_span = covered.gather(1, rel.clamp(0, max_d + 1).permute(1, 0, 2).reshape(h, -1)).view(h, len(starts), -1)
    first = torch.ones_like(verticals, dtype=torch.bool)
    first[:, 1:] = verticals[:, 1:] != verticals[:, :-1]  # the padding repeats an index: keep it once
    free = (rel > 0) & ((rel > max_d) | ~in_span.transpose(0, 1)) & first[None]  # [B, H, V]
    return [[BlockKeys([(max(a - u_hi + 1, 0), a - u_lo + 1) for u_lo, u_hi in reversed(runs[head]) if u_lo <= a],
                       verticals[head][free[i, head]]) for i, a in enumerate(starts.tolist())]
            for head in range(h)]


def block_sparse_plan(q: torch.Tensor, k: torch.Tensor, q_start: int, block: int, top_blocks: torch.Tensor,
                      key_block: int = 64, heads: torch.Tensor | None = None) -> Plan:
    """q: [n, H, D] rotated, k: [Hkv, >= q_start, D] rotated keys; per query block, the top_blocks[h] key blocks
    (of key_block keys, all before the chunk) by mean-pooled score, the first one always kept, and the keys
    between the last whole key block and the query block. heads: only these (top_blocks given for them) -> a
    plan of len(heads) rows. Scored for every block and head at once: it runs per layer and prefill chunk."""
    n, h, dim = q.shape
    heads = torch.arange(h) if heads is None else heads.cpu()
    group = h // k.shape[0]
    starts = block_starts(q_start, n, block)
    nkb = q_start // key_block  # every query block starts at or after q_start: it sees all nkb key blocks
    tops = torch.as_tensor(top_blocks).clamp(min=1, max=nkb).tolist()
    chosen = [[[] for _ in starts] for _ in heads]
    if nkb:
        pooled_k = k[:, :nkb * key_block].float().reshape(k.shape[0], nkb, key_block, dim).mean(2)  # [Hkv, nkb, D]
        qs = q[:, heads.to(q.device)].float()  # [n, Hs, D]
        pad = len(starts) * block - n
        sums = torch.nn.functional.pad(qs, (0, 0, 0, 0, 0, pad)).reshape(len(starts), block, len(heads), dim).sum(1)
        rows = sums / torch.tensor([min(block, n - i * block) for i in range(len(starts))], device=q.device)[:, None, None]
        score = torch.einsum("bhd,hkd->bhk", rows, pooled_k[(heads // group).to(k.device)])  # [B, Hs, nkb]
        score[..., 0] = float("inf")
        best = torch.topk(score, max(tops), dim=-1).indices.cpu()  # [B, Hs, max top], best first
        for j, top in enumerate(tops):
            for i, picked in enumerate(best[:, j, :top].sort(dim=-1).values.tolist()):
                chosen[j][i] = picked
    plans = []
    for j in range(len(heads)):
        per_head = []
        for i, a in enumerate(starts):
            ranges = [(lo * key_block, hi * key_block) for lo, hi in list_runs(chosen[j][i])]
            if nkb * key_block < a:  # the keys between the last whole key block and the query block: local
                ranges.append((nkb * key_block, a))
            per_head.append(BlockKeys(merge_ranges(ranges), torch.empty(0, dtype=torch.long)))
        plans.append(per_head)
    return plans


def list_runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints -> maximal runs of consecutive values as (first, last + 1)."""
    runs = []
    for x in values:
        if runs and runs[-1][1] == x:
            runs[-1][1] = x + 1
        else:
            runs.append([x, x + 1])
    return [(lo, hi) for lo, hi in runs]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def plan_mask(plan: Plan, q_start: int, n: int, block: int, m: int) -> torch.Tensor:
    """[H, n, m] bool from the definition: own block causal, plus the planned earlier keys."""
    h = len(plan)
    mask = torch.zeros(h, n, m, dtype=torch.bool)
    for i, a in enumerate(block_starts(q_start, n, block)):
        rows = slice(a - q_start, min(n, a - q_start + block))
        for p in range(rows.start, rows.stop):
            mask[:, p, a:q_start + p + 1] = True
        for head in range(h):
            mask[head, rows, plan[head][i].indices()] = True
    return mask


def plan_density(plan: Plan, q_start: int, n: int, block: int) -> float:
    """Fraction of the causal (query, key) pairs the plan computes (own blocks counted whole)."""
    done = 0
    for i, a in enumerate(block_starts(q_start, n, block)):
        rows = min(block, q_start + n - a)
        done += sum(plan[h][i].size() for h in range(len(plan))) * rows + len(plan) * rows * (rows + 1) / 2
    causal = len(plan) * (n * q_start + n * (n + 1) / 2)
    return done / causal if causal else 1.0
