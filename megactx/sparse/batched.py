"""Sparse prefill attention in batched calls: every (head, query block)'s planned keys gathered, padded and
computed in a few flash calls, for plans of many short key ranges (the pooled estimate's 64-key groups).

Why: kernel.py makes a flash call per head and query block, with its own span arithmetic, gather and merge
around it. On a pooled plan the calls are short (a 256-row block against ~2K keys: about 1 ms), and the Python
and small-tensor work around each came to 20-24 % of the layer's time on pieces captured from a 30K prefill of
the evaluation model (layers 4 and 21). Here the plan becomes one index of key positions for the whole chunk
(vectorised, no per-block span arithmetic), entries of similar length are batched, and each batch is one flash
call: queries [B, 1, rows, D] against keys [B, 1, m_max, D] gathered from the cache, an additive key mask
[B, 1, 1, m_max] (-inf on the padding; the flash kernel broadcasts it over the rows at no measured cost) hiding
the padding. The results are scattered into one full-height part per DCA segment, merged once by LSE with the
own blocks. Every planned key is computed exactly once for each row that plans it, as in kernel.py, whose
per-block path stays the general one (exact diagonals, wide shared spans as views, other devices) and, with
plan_mask(), the oracle.
"""
from __future__ import annotations

import torch

from megactx.attention.dense import _flash_cpu
from megactx.attention.merge import merge_attention
from megactx.sparse.kernel import KeySource, own_blocks, sparse_attention
from megactx.sparse.plan import Plan, block_starts

BATCH_KEYS = 1 << 18  # padded keys gathered per call: k and v 64 MB each at D = 64 in fp32
KERNEL_NAME = "batched, gathered, padded to 64 keys"  # benchmarks record it
GROUP_PAD = 64  # entry lengths are padded up to a multiple of this (the pooled groups)


def supports(plan: Plan, keys: KeySource, device: torch.device) -> bool:
    """The batched path needs the CPU flash kernel, a contiguous cache (gathered through one flat index) and
    plans without exact diagonals."""
    return (_flash_cpu is not None and device.type == "cpu" and keys.k.device.type == "cpu"
            and keys.k.is_contiguous() and keys.v.is_contiguous()
            and not any(len(b.diagonals) for head in plan for b in head))


def plan_bounds(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """-> bounds [R, 2]: every (head, block) entry's key ranges, its columns as one-key ranges, entry by entry
    (head-major); entry [R]: the entry (head * blocks + block) of each range."""
    bounds: list[tuple[int, int]] = []
    counts: list[int] = []
    for head in plan:
        for b in head:
            cols = b.columns.cpu().tolist()
            bounds.extend(b.ranges)
            bounds.extend((c, c + 1) for c in cols)
            counts.append(len(b.ranges) + len(cols))
    entry = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    return torch.tensor(bounds, dtype=torch.long).view(-1, 2), entry


def _expand(bounds: torch.Tensor, entry: torch.Tensor, num_entries: int):
    """Ranges (in entry order) -> positions [P] (entry by entry), each entry's length [E] and first index [E]."""
    lengths = bounds[:, 1] - bounds[:, 0]
    shift = bounds[:, 0] - (lengths.cumsum(0) - lengths)
    pos = torch.arange(int(lengths.sum())) + shift.repeat_interleave(lengths)
    entry_len = torch.zeros(num_entries, dtype=torch.long).index_add_(0, entry, lengths)
    return pos, entry_len, entry_len.cumsum(0) - entry_len


def _batches(entries: torch.Tensor, width: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Entries grouped by padded width (their length rounded up to GROUP_PAD keys: a pooled plan's entries mostly
    share exact lengths, so most calls need no mask), each group cut into batches of at most budget keys."""
    order = entries[width[entries].argsort(stable=True)]
    widths, counts = width[order].unique_consecutive(return_counts=True)
    out = []
    for group, w in zip(order.split(counts.tolist()), widths.tolist()):
        per_call = max(1, budget // w)
        out.extend(group.split(per_call))
    return out


def batched_sparse_attention(segments: list[tuple[int, int, torch.Tensor]], keys: KeySource, plan: Plan,
                             q_start: int, block: int, scale: float,
                             batch_keys: int = BATCH_KEYS) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_attention() (kernel.py), the same inputs and result, in batched calls.
    segments: (lo, hi, q [n, H, D]) -> out [n, H, D], lse [n, H] (fp32)."""
    q0 = segments[0][2]
    n, h, d = q0.shape
    if not supports(plan, keys, q0.device):
        return sparse_attention(segments, keys, plan, q_start, block, scale)
    hkv, num_slots = keys.k.shape[:2]
    starts = block_starts(q_start, n, block)
    nb = len(starts)
    rows_pad = nb * block - n  # the last block's missing rows: zero queries, their results dropped
    own_out, own_lse = own_blocks(segments, keys, q_start, block, scale)
    bounds, entry = plan_bounds(plan)  # entry e = head * nb + block
    kv_of_entry = torch.arange(h).repeat_interleave(nb) // (h // hkv)
    k_flat, v_flat = keys.k.view(hkv * num_slots, d), keys.v.view(hkv * num_slots, d)  # supports(): contiguous
    outs, lses = [own_out], [own_lse]
    for lo, hi, q in segments:
        # the ranges' keys this segment's queries score
        clipped = torch.stack([bounds[:, 0].clamp(min=lo), bounds[:, 1].clamp(max=hi)], 1)
        keep = clipped[:, 1] > clipped[:, 0]
        if not bool(keep.any()):
            continue
        pos, entry_len, entry_first = _expand(clipped[keep], entry[keep], h * nb)
        slots = pos + keys.slots.start if isinstance(keys.slots, slice) else keys.slots.cpu()[pos]
        # queries as [H * nb, block, D]: entry e's rows are row e of it (one copy of the chunk's queries)
        q_blocks = torch.nn.functional.pad(q.transpose(0, 1), (0, 0, 0, rows_pad)).reshape(h * nb, block, d)
        part_out = torch.zeros(h * nb, block, d, dtype=q.dtype, device=q.device)
        part_lse = torch.full((h * nb, block), float("-inf"), device=q.device)
        width = (entry_len + GROUP_PAD - 1) // GROUP_PAD * GROUP_PAD
        for batch in _batches((entry_len > 0).nonzero()[:, 0], width, batch_keys):
            w = int(width[batch[0]])
            j = torch.arange(w)
            # [B, w] index into pos; the padding repeats the entry's last key and is masked out
            at = entry_first[batch][:, None] + torch.minimum(j[None], entry_len[batch][:, None] - 1)
            flat = (kv_of_entry[batch][:, None] * num_slots + slots[at]).flatten().to(keys.k.device)
            k = k_flat.index_select(0, flat).view(len(batch), 1, w, d).to(keys.dtype)
            v = v_flat.index_select(0, flat).view(len(batch), 1, w, d).to(keys.dtype)
            mask = None
            if bool((entry_len[batch] < w).any()):
                mask = torch.zeros(len(batch), 1, 1, w, device=q.device)  # fp32 for bf16 queries too
                mask.masked_fill_((j[None] >= entry_len[batch][:, None])[:, None, None].to(q.device), float("-inf"))
            on = batch.to(q.device)
            o, s = _flash_cpu(q_blocks.index_select(0, on)[:, None], k, v, 0.0, False, attn_mask=mask, scale=scale)
            part_out.index_copy_(0, on, o[:, 0].to(q.dtype))
            part_lse.index_copy_(0, on, s[:, 0])
        # back to [n, H, D] and [n, H] (views)
        outs.append(part_out.view(h, nb * block, d)[:, :n].transpose(0, 1))
        lses.append(part_lse.view(h, nb * block)[:, :n].t())
    return merge_attention(outs, lses)
