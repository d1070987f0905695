"""Pooled block estimate: query rows against each 64-key group's mean key (`--sparse-estimate pooled`).

The default when the model has no budgets file.

The vertical-slash estimate (estimate.py) scores keys from a chunk's last queries only, and under Dual Chunk
Attention those queries predict the rest of the chunk poorly: at 64K, on the evaluation model, its plans kept a
mean recall of 0.85 where an oracle at the kernel's granularity needed a quarter of the pairs for the same
(benchmarks/STUDIES.md, "How sparse the attention is"). This estimate looks at rows all over the chunk, but cheaply:

1. Each group of GROUP consecutive keys is pooled into its mean key (its score gets + log(group size), the
   share a group of equal keys would take).
2. The scores of every ROW_STRIDE-th row of each query block against the group means (with the query rotation
   of the DCA part the group's first key is in), softmax over the groups the row can see: the row's estimated
   attention per group.
3. Summed over those rows: the block's estimated attention per group. Of the groups before the block, each head
   keeps its best ones until they reach `cutoff` of what all of them score; the first group (the attention
   sinks), the group just before the block and the first group of each DCA part are always kept, and the kernel
   computes the block's own keys anyway.

It costs 1/(GROUP x ROW_STRIDE) of the dense scores plus a softmax over m/GROUP groups per estimating row. The
chosen groups are key ranges of the cache (plan.py BlockKeys), so the kernel reads them as views or gathers the
short ones.
reference_pooled_scores() writes steps 1-3 out row by row: the tests' oracle.
"""
from __future__ import annotations

import torch

from megactx.attention.sparse.plan import BlockKeys, Plan, list_runs, merge_ranges, block_starts

GROUP = 64  # keys per pooled group: MInference's block-sparse key blocks, and the kernel's gather granularity
# rows of a query block that estimate it. On pieces captured from a 30K prefill (6144 rows, 30720 keys; layers 5,
# 13, 20) every 4th row planned the same density within 0.006 and recall within 0.003 of every row (cut-offs 0.8
# and 0.9), at 0.03 s an estimate instead of 0.11-0.18 s
ROW_STRIDE = 4


def group_sums(k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """k [Hkv, >= hi x GROUP, D] (any float dtype) -> the fp32 key sums of whole groups lo..hi-1 [Hkv, hi - lo, D],
    without an fp32 copy of a bf16 k (0.5 GB at 1M keys of the 0.5B model)."""
    hkv, _, d = k.shape
    return k[:, lo * GROUP:hi * GROUP].reshape(hkv, hi - lo, GROUP, d).sum(2, dtype=torch.float32)


def group_means(k: torch.Tensor, m: int, sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k [Hkv, >= m, D] (any float dtype) -> mean key of each group of the first m keys [Hkv, G, D] (fp32) and log
    of its size [G]. sums: group_sums of the m // GROUP whole groups when the caller kept them (SparsePrefill, from
    chunk to chunk of one sequence); k is then read only for a last, partial group."""
    hkv, _, d = k.shape
    full = m // GROUP
    sums = [group_sums(k, 0, full) if sums is None else sums]
    size = [torch.full((full,), float(GROUP))]
    if m > full * GROUP:  # a last, partial group
        sums.append(k[:, full * GROUP:m].sum(1, keepdim=True, dtype=torch.float32))
        size.append(torch.tensor([float(m - full * GROUP)]))
    size = torch.cat(size)
    return torch.cat(sums, 1) / size.to(k.device)[None, :, None], size.log()


def pooled_scores(segments: list[tuple[int, int, torch.Tensor]], k: torch.Tensor, q_start: int, block: int,
                  scale: float, row_stride: int = ROW_STRIDE,
                  means: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """segments: (lo, hi, q [n, H, D]) as the kernel takes them; k [Hkv, >= q_start + n, D] -> [H, B, G] each
    query block's summed estimated attention per group (G: the groups up to the chunk's end), from every
    row_stride-th row of the block (its last row first). One row block at a time: a [H, rows, G] buffer, not
    [H, n, G] (14 heads x 8K rows x 1K groups would be 470 MB). Measured at 8K rows and 64K keys, 14 heads: the
    product into a kept buffer with pre-transposed means took 0.13 s against 0.30 s for a fresh one with
    transposed means, and the causal mask on the last groups only 1/200 of the whole-buffer fill (0.14 s).
    means: group_means(k, q_start + n) when the caller has them (context parallelism); k is then not read."""
    n, h, d = segments[0][2].shape
    hkv = k.shape[0]
    m = q_start + n
    means, log_size = group_means(k, m) if means is None else means
    means_t = (means * scale).transpose(1, 2).contiguous()  # [Hkv, D, G]: the scale folded in once
    log_size = log_size.to(k.device)
    g_total = means.shape[1]
    starts = block_starts(q_start, n, block)
    out = torch.zeros(h, len(starts), g_total, dtype=torch.float32, device=k.device)
    # each group is scored with the queries of the segment its first key is in
    first = torch.arange(g_total, device=k.device) * GROUP
    seg_groups = [(int((first < lo).sum()), int((first < hi).sum()), q) for lo, hi, q in segments]
    buffer = torch.empty(hkv * -(-block // row_stride) * (h // hkv) * g_total, dtype=torch.float32, device=k.device)
    for i, a in enumerate(starts):
        end = min(n, a - q_start + block)
        rows = torch.arange(end - 1, a - q_start - 1, -row_stride, device=k.device).flip(0)  # ends on the last row
        r = len(rows)
        g_end = -(-(q_start + end) // GROUP)  # groups whose first key some row of the block sees
        logits = buffer[:h * r * g_end].view(hkv, h // hkv * r, g_end)
        for g0, g1, q in seg_groups:
            g1 = min(g1, g_end)
            if g1 <= g0:
                continue
            qb = q[rows].float().transpose(0, 1).reshape(hkv, -1, d)  # [Hkv, heads of the kv head x rows, D]
            if g0 == 0 and g1 == g_end:  # one segment: straight into the buffer
                torch.bmm(qb, means_t[:, :, :g_end], out=logits)
            else:
                logits[:, :, g0:g1] = torch.bmm(qb, means_t[:, :, g0:g1])
        logits = logits.view(h, r, g_end)
        logits.add_(log_size[:g_end])
        g_own = a // GROUP  # the groups from here on may start after some row: causal
        late = first[g_own:g_end][None, None, :] > (q_start + rows)[None, :, None]
        logits[:, :, g_own:].masked_fill_(late, float("-inf"))
        out[:, i, :g_end] = logits.softmax(-1).sum(1)
    return out


def reference_pooled_scores(segments, k: torch.Tensor, q_start: int, block: int, scale: float,
                            row_stride: int = 1) -> torch.Tensor:
    """pooled_scores() from the definition, one row, head and group at a time (small inputs only)."""
    n, h, d = segments[0][2].shape
    m = q_start + n
    group = h // k.shape[0]
    g_total = -(-m // GROUP)
    starts = block_starts(q_start, n, block)
    out = torch.zeros(h, len(starts), g_total)
    for head in range(h):
        for row in range(n):
            last = min(n, (row // block + 1) * block) - 1  # the block's last row, always an estimating one
            if (last - row) % row_stride:
                continue
            p = q_start + row
            logits = torch.full((g_total,), float("-inf"))
            for g in range(g_total):
                lo, hi = g * GROUP, min((g + 1) * GROUP, m)
                if lo > p:
                    continue
                q = next(q for s_lo, s_hi, q in segments if s_lo <= lo < s_hi)
                mean = k[head // group, lo:hi].double().mean(0)
                logits[g] = float(q[row, head].double() @ mean) * scale + torch.log(torch.tensor(float(hi - lo)))
            out[head, row // block] += logits.softmax(0)
    return out


def forced_groups(q_start: int, n: int, block: int, g_total: int, parts: list[tuple[int, int]]) -> torch.Tensor:
    """[B, G] bool: the groups every head of a block keeps (sinks, the group just before the block, each DCA
    part's first group), of those before the block."""
    starts = block_starts(q_start, n, block)
    forced = torch.zeros(len(starts), g_total, dtype=torch.bool)
    for i, a in enumerate(starts):
        if a > 0:
            forced[i, 0] = True
            forced[i, (a - 1) // GROUP] = True
        for lo, hi in parts:
            if hi > lo and lo < a:
                forced[i, lo // GROUP] = True
    return forced


def pooled_plan(score: torch.Tensor, q_start: int, n: int, block: int, cutoff: float,
                parts: list[tuple[int, int]] = (), max_keys: int | None = None) -> Plan:
    """score [H, B, G] from pooled_scores -> the plan: per head and block, the best groups before the block until
    their score reaches cutoff of the score of all groups before it (counted without the forced ones), and at most
    max_keys // GROUP of them (a budget that does not grow with the context: the attention's cost becomes linear),
    plus the forced groups, as key ranges clipped to the block's start."""
    h, nb, g_total = score.shape
    starts = block_starts(q_start, n, block)
    first = torch.arange(g_total) * GROUP
    before = first[None, :] < torch.tensor(starts)[:, None]  # [B, G] groups with a key before the block
    forced = forced_groups(q_start, n, block, g_total, parts) & before
    candidate = (before & ~forced)[None]
    s = score.cpu().masked_fill(~candidate, 0)
    # candidates best first (ties in group order, as the reference), the others after them
    best = score.cpu().masked_fill(~candidate, float("-inf")).sort(dim=-1, descending=True, stable=True)
    values = best.values.clamp(min=0)
    keep = values.cumsum(-1) - values < cutoff * s.sum(-1, keepdim=True)
    if cutoff >= 1:  # everything before the block, even groups whose estimate underflowed to 0
        keep = torch.ones_like(keep)
    if max_keys is not None:
        keep[..., max_keys // GROUP:] = False
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter(-1, best.indices, keep) & before[None] | forced[None]
    # maximal runs of chosen groups, all heads and blocks at once: (head, block, first group) and one past the last
    pad = torch.nn.functional.pad(chosen, (1, 1))
    run_lo = (pad[..., 1:-1] & ~pad[..., :-2]).nonzero()  # [R, 3] in (head, block, group) order
    run_hi = (pad[..., 1:-1] & ~pad[..., 2:]).nonzero()[:, 2] + 1
    counts = torch.bincount(run_lo[:, 0] * nb + run_lo[:, 1], minlength=h * nb).tolist()
    a_of = torch.tensor(starts)[run_lo[:, 1]]
    los = (run_lo[:, 2] * GROUP).split(counts)
    his = torch.minimum(run_hi * GROUP, a_of).split(counts)  # a group straddling the block's start is cut there
    empty = torch.empty(0, dtype=torch.long)
    return [[BlockKeys(list(zip(los[head * nb + i].tolist(), his[head * nb + i].tolist())), empty)
             for i in range(nb)] for head in range(h)]


def reference_pooled_plan(score: torch.Tensor, q_start: int, n: int, block: int, cutoff: float,
                          parts: list[tuple[int, int]] = (), max_keys: int | None = None) -> Plan:
    """pooled_plan() one head and block at a time, groups taken best first while the score before them is below
    cutoff of the total and fewer than max_keys // GROUP are taken."""
    h, nb, g_total = score.shape
    forced = forced_groups(q_start, n, block, g_total, parts)
    plan = []
    for head in range(h):
        rows = []
        for i, a in enumerate(block_starts(q_start, n, block)):
            before = [g for g in range(g_total) if g * GROUP < a]
            candidates = [g for g in before if not forced[i, g]]
            total = sum(float(score[head, i, g]) for g in candidates)
            taken, kept, budget = 0.0, {g for g in before if forced[i, g]}, len(candidates)
            if max_keys is not None:
                budget = min(budget, max_keys // GROUP)
            for g in sorted(candidates, key=lambda g: -float(score[head, i, g]))[:budget]:
                if cutoff < 1 and taken >= cutoff * total:
                    break
                kept.add(g)
                taken += float(score[head, i, g])
            ranges = [(lo * GROUP, min(hi * GROUP, a)) for lo, hi in list_runs(sorted(kept))]
            rows.append(BlockKeys(merge_ranges(ranges), torch.empty(0, dtype=torch.long)))
        plan.append(rows)
    return plan
