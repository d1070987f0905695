"""Coarse-to-fine pooled estimate: score 1,024-key super-groups first, refine only the best ones into 64-key groups.

The pooled estimate (pooled.py) scores every estimating row against every 64-key group mean: m / 64 products a
row, which at a million keys is as much work as a dense attention of 16K tokens for every chunk. This estimate
does it in two steps per query block:

1. Every estimating row against each SUPER-key super-group's mean key (+ log of its size), softmax over the
   super-groups the row can see, summed over the block's rows: the block's coarse attention per super-group.
2. Per head, the `refine` best super-groups before the block, plus the first one (the attention sinks) and those
   from the one holding the key just before the block to the block's end (the local keys), are split into their
   64-key groups. Each row's softmax then runs over those groups and the other super-groups taken whole; a
   refined group gets its own estimated attention, an unrefined super-group's is spread evenly over its groups
   (so the plan's cut-off still compares against everything a block can see).

Per row it costs m / SUPER + (refine + 3) x SUPER / 64 products instead of m / 64: at 1M keys and refine 32,
about 1.6K instead of 16K. With refine covering every super-group it is the pooled estimate exactly. A group
(or super-group) is scored with the queries of the DCA segment its first key is in, as in pooled.py.
reference_coarse_to_fine_scores() is the row-by-row definition: the tests' oracle.
"""
from __future__ import annotations

import torch

from megactx.attention.sparse import pooled
from megactx.attention.sparse.plan import block_starts

SUPER = 1024  # keys per super-group


def _segment_of(first: torch.Tensor, segments) -> torch.Tensor:
    """The index of the segment each key position in `first` lies in."""
    his = torch.tensor([hi for _, hi, _ in segments], device=first.device)
    return torch.searchsorted(his, first, right=True).clamp(max=len(segments) - 1)


def _scores(q_rows: list[torch.Tensor], means: torch.Tensor, seg: torch.Tensor, rep: int) -> torch.Tensor:
    """q_rows: per segment [H, r, D] (scaled); means [H or Hkv, N, D] -> logits [H, r, N], each column from the
    queries of its own segment."""
    if means.shape[0] != q_rows[0].shape[0]:
        means = means.repeat_interleave(rep, 0)
    out = None
    for j, q in enumerate(q_rows):
        if out is not None and not bool((seg == j).any()):
            continue
        part = torch.bmm(q, means.transpose(1, 2))
        out = part if out is None else torch.where((seg == j)[..., None, :] if seg.dim() > 1 else seg == j, part, out)
    return out


def coarse_to_fine_scores(segments: list[tuple[int, int, torch.Tensor]], k: torch.Tensor, q_start: int, block: int,
                          scale: float, refine: int, row_stride: int = pooled.ROW_STRIDE,
                          means: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """As pooled.pooled_scores (segments, k [Hkv, >= m, D] -> [H, B, G]), refining `refine` super-groups a block.

    Step 1 runs for all the chunk's estimating rows at once. In step 2 a block's columns are, in this order: the
    refined groups each head chose (gathered), the sinks' super-group and the local ones (the same for every
    head: plain slices, and the only columns a row may not see yet), and the unrefined super-groups' logits from
    step 1. Masks touch only the columns that can need them. means: as pooled_scores."""
    group = pooled.GROUP
    per = SUPER // group
    n, h, d = segments[0][2].shape
    hkv = k.shape[0]
    rep = h // hkv
    m = q_start + n
    means, log_size = pooled.group_means(k, m) if means is None else means  # [Hkv, G, D]
    g_total = means.shape[1]
    s_total = -(-g_total // per)
    size = log_size.exp()
    pad = s_total * per - g_total
    sums = torch.nn.functional.pad(means * size[None, :, None], (0, 0, 0, pad)).view(hkv, s_total, per, d).sum(2)
    s_size = torch.nn.functional.pad(size, (0, pad)).view(s_total, per).sum(1)
    s_means, s_log = sums / s_size[None, :, None], s_size.log()
    g_first = torch.arange(g_total) * group
    s_first = torch.arange(s_total) * SUPER
    g_seg, s_seg = _segment_of(g_first, segments), _segment_of(s_first, segments)
    kv_head = torch.arange(h) // rep
    starts = block_starts(q_start, n, block)
    # the estimating rows of every block, each block's ending on its last row
    rows_of = [torch.arange(min(n, a - q_start + block) - 1, a - q_start - 1, -row_stride).flip(0) for a in starts]
    rows = torch.cat(rows_of)
    pos = q_start + rows
    q_rows = [(q[rows].float() * scale).transpose(0, 1) for _, _, q in segments]  # [H, rows, D] each
    # 1. coarse: every estimating row against every super-group; only those starting inside the chunk can be late
    coarse_logits = _scores(q_rows, s_means, s_seg, rep) + s_log  # [H, rows, S]
    tail = int((s_first < q_start).sum())
    coarse_logits[:, :, tail:].masked_fill_(s_first[tail:][None, None, :] > pos[None, :, None], float("-inf"))
    coarse_probs = coarse_logits.softmax(-1)
    out = torch.zeros(h, len(starts), g_total, dtype=torch.float32)
    row0 = 0
    for i, (a, block_rows) in enumerate(zip(starts, rows_of)):
        r = len(block_rows)
        sl = slice(row0, row0 + r)
        row0 += r
        end = q_start + int(block_rows[-1]) + 1  # one past the block's last key
        s_end, g_end = -(-end // SUPER), -(-end // group)
        local = max(a - 1, 0) // SUPER
        # 2. the refined super-groups: the sinks' (0), the local ones (local .. s_end - 1), the best `refine` others
        others = coarse_probs[:, sl, 1:local].sum(1)  # [H, local - 1]
        picked = others.topk(min(refine, others.shape[1]), dim=-1).indices + 1  # [H, R]
        gidx = (picked[:, :, None] * per + torch.arange(per)).flatten(1)  # [H, R x per], all before the block
        first_local = max(local * per, per)
        fixed = torch.cat([torch.arange(0, min(per, g_end)), torch.arange(first_local, max(first_local, g_end))])
        fine_means = means[kv_head[:, None], gidx]
        fine_logits = torch.cat([_scores([q[:, sl] for q in q_rows], fine_means, g_seg[gidx], rep),
                                 _scores([q[:, sl] for q in q_rows], means[:, fixed], g_seg[fixed], rep)], -1)
        fine_logits += torch.cat([log_size[gidx], log_size[fixed].expand(h, -1)], -1)[:, None, :]
        n_fixed_early = int((g_first[fixed] < a).sum())  # fixed groups no row of the block can find late
        late_cols = fine_logits[:, :, gidx.shape[1] + n_fixed_early:]
        late_cols.masked_fill_(g_first[fixed[n_fixed_early:]][None, None, :] > (q_start + block_rows)[None, :, None],
                               float("-inf"))
        rest_logits = coarse_logits[:, sl, :s_end].clone()
        rest_logits[:, :, 0] = float("-inf")
        rest_logits[:, :, local:] = float("-inf")
        rest_logits.scatter_(-1, picked[:, None, :].expand(-1, r, -1), float("-inf"))
        probs = torch.cat([fine_logits, rest_logits], -1).softmax(-1).sum(1)  # [H, fine columns + s_end]
        nf = gidx.shape[1]
        out[:, i].scatter_add_(-1, gidx, probs[:, :nf])
        out[:, i, fixed] += probs[:, nf:nf + len(fixed)]
        rest = probs[:, nf + len(fixed):]  # [H, s_end], 0 where refined
        out[:, i, :min(g_end, local * per)] += (rest[:, :local] / per).repeat_interleave(per, -1)[:, :g_end]
    return out


def reference_coarse_to_fine_scores(segments, k: torch.Tensor, q_start: int, block: int, scale: float, refine: int,
                                    row_stride: int = 1) -> torch.Tensor:
    """coarse_to_fine_scores() from the definition, one head, block and row at a time (small inputs only)."""
    group = pooled.GROUP
    per = SUPER // group
    n, h, d = segments[0][2].shape
    m = q_start + n
    rep = h // k.shape[0]
    g_total = -(-m // group)
    out = torch.zeros(h, -(-n // block), g_total, dtype=torch.float64)

    def logit(row: int, head: int, lo: int, hi: int) -> float:
        q = next(q for s_lo, s_hi, q in segments if s_lo <= lo < s_hi)
        mean = k[head // rep, lo:hi].double().mean(0)
        return float(q[row, head].double() @ mean) * scale + float(torch.log(torch.tensor(float(hi - lo))))

    for i, a in enumerate(block_starts(q_start, n, block)):
        end = min(n, a - q_start + block)
        rows = [r for r in range(a - q_start, end) if (end - 1 - r) % row_stride == 0]
        s_end = -(-(q_start + end) // SUPER)
        for head in range(h):
            coarse = torch.zeros(s_end, dtype=torch.float64)
            for row in rows:
                p = q_start + row
                lg = torch.tensor([logit(row, head, s * SUPER, min((s + 1) * SUPER, m)) if s * SUPER <= p
                                   else float("-inf") for s in range(s_end)])
                coarse += lg.softmax(0)
            forced = {0, *range(max(a - 1, 0) // SUPER, s_end)}
            others = sorted((s for s in range(s_end) if s not in forced), key=lambda s: -float(coarse[s]))
            chosen = forced | set(others[:refine])
            for row in rows:
                p = q_start + row
                entries = []  # (groups it stands for, logit)
                for s in range(s_end):
                    if s in chosen:
                        for g in range(s * per, min((s + 1) * per, g_total)):
                            if g * group <= p:
                                entries.append(([g], logit(row, head, g * group, min((g + 1) * group, m))))
                    elif s * SUPER <= p:
                        entries.append((list(range(s * per, (s + 1) * per)),
                                        logit(row, head, s * SUPER, min((s + 1) * SUPER, m))))
                probs = torch.tensor([lg for _, lg in entries], dtype=torch.float64).softmax(0)
                for (groups, _), pr in zip(entries, probs):
                    for g in groups:
                        out[head, i, g] += float(pr) / len(groups)
    return out
