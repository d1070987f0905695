"""Sparse prefill attention in batched calls: every (head, query block)'s planned keys gathered, padded and
computed in a few flash calls, for plans of many short key ranges (the pooled estimate's 64-key groups).

Why: kernel.py makes a flash call per head and query block, with its own span arithmetic, gather and merge
around it. On a pooled plan the calls are short (a 256-row block against ~2K keys: about 1 ms), and the Python
and small-tensor work around each came to 20-24 % of the layer's time on pieces captured from a 30K prefill of
the evaluation model (layers 4 and 21). Here the plan becomes one index of key positions for the whole chunk
(vectorised, no per-block span arithmetic), entries of similar length are batched, and each batch is one flash
call: queries [B, 1, rows, D] against keys [B, 1, m_max, D] gathered from the cache, an additive key mask
[B, 1, 1, m_max] (-inf on the padding; the flash kernel broadcasts it over the rows at no measured cost) hiding
the padding. The results are scattered into full-height parts per DCA segment, merged once by LSE with the own
blocks. Every planned key is computed exactly once for each row that plans it, as in kernel.py, whose per-block
path stays the general one (wide shared spans as views, other devices) and, with plan_mask(),
the oracle.

Taller calls for the keys a tile of TILE_BLOCKS consecutive blocks all read: torch's CPU flash kernel splits a
call's queries into 64-row tiles below 768 rows and into 256-row tiles from there, and the taller tiles run
faster where the CPU has AVX512 (kernel.py's docstring: 0.84-0.87 against 0.66-0.70 Gpair/s). A head's
consecutive blocks mostly keep the same heavy groups, so those keys are one (head, tile) entry of
TILE_BLOCKS x block rows, and each block computes only the rest of its plan. On pieces captured from a 32K
prefill of the evaluation model (2045 rows, 30K keys, AVX512, 2 threads), tiles of 4 blocks held 24 % (layer 4)
to 67 % (layer 23) of the pairs and the piece took 8 % less time (0.213 -> 0.196 s, 0.486 -> 0.446 s); tiles of
2 and 8 gained less.
"""
from __future__ import annotations

import torch

from megactx.attention.dense import flash_cpu
from megactx.attention.kv_quant import dequantize
from megactx.attention.merge import merge_attention
from megactx.attention.sparse.kernel import KeySource, own_blocks, sparse_attention
from megactx.attention.sparse.plan import BlockKeys, Plan, block_starts

BATCH_KEYS = 1 << 18  # padded keys gathered per call: k and v 64 MB each at D = 64 in fp32
GROUP_PAD = 64  # entry lengths are padded up to a multiple of this (the pooled groups)
TILE_BLOCKS = 4  # 4 x 256 = 1024-row calls for the keys all blocks of a tile read (1: no sharing)


def supports(keys: KeySource, device: torch.device) -> bool:
    """The batched path needs the CPU flash kernel and a contiguous cache (gathered through one flat index)."""
    return (flash_cpu is not None and device.type == "cpu" and keys.k.device.type == "cpu"
            and keys.k.is_contiguous() and keys.v.is_contiguous())


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


def clip_plan(plan: Plan, clip) -> Plan:
    """The plan with every (head, block) entry's keys cut to what clip keeps: clip(bounds [R, 2], entry [R]) ->
    the same for the kept pieces, in entry order (context parallelism: the keys one rank holds)."""
    bounds, entry = clip(*plan_bounds(plan))
    nb = len(plan[0]) if plan else 0
    counts = torch.bincount(entry, minlength=len(plan) * nb).tolist()
    pieces = bounds.split(counts)
    empty = torch.empty(0, dtype=torch.long)
    return [[BlockKeys([tuple(r) for r in pieces[head * nb + i].tolist()], empty) for i in range(nb)]
            for head in range(len(plan))]


def covered(bounds: torch.Tensor, entry: torch.Tensor, weight: torch.Tensor,
            want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ranges per entry -> the spans (entry by entry, in key order) where the weights of the ranges
    covering a key add up to want[entry]. One sweep over the ranges' ends, all entries at once."""
    if len(bounds) == 0:
        return bounds, entry
    m = int(bounds.max()) + 1
    ev_entry, ev_pos = entry.repeat(2), bounds.t().flatten()
    order = (ev_entry * m + ev_pos).argsort()
    e, p = ev_entry[order], ev_pos[order]
    count = torch.cat([weight, -weight])[order].cumsum(0)  # each entry's ends sum to 0: no reset needed
    # between an event and the next one of the same entry, the count after all events at that key holds
    ok = (e[:-1] == e[1:]) & (p[1:] > p[:-1]) & (count[:-1] == want[e[:-1]])
    return torch.stack([p[:-1][ok], p[1:][ok]], 1), e[:-1][ok]


def split_tiles(bounds: torch.Tensor, entry: torch.Tensor, h: int, nb: int,
                tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (head, block) plan's ranges -> the keys every block of a full tile reads, per (head, tile) entry
    (head * (nb // tile) + tile), and each block's remaining ranges per (head, block) entry. Needs each block's
    ranges disjoint, as plans are (every key once per row)."""
    nt = nb // tile
    block = entry % nb
    full = block < nt * tile
    tile_entry = entry // nb * nt + block // tile
    ones = torch.ones(len(bounds), dtype=torch.long)
    shared, shared_entry = covered(bounds[full], tile_entry[full], ones[full], torch.full((h * nt,), tile))
    # each block of the tile subtracts the tile's shared spans: what is left has count 1
    heads, tiles = shared_entry // nt, shared_entry % nt
    copies = (heads * nb + tiles * tile)[:, None] + torch.arange(tile)  # [S, tile] the blocks of each span's tile
    rest, rest_entry = covered(torch.cat([bounds, shared.repeat_interleave(tile, 0)]),
                               torch.cat([entry, copies.flatten()]),
                               torch.cat([ones, -torch.ones(len(shared) * tile, dtype=torch.long)]),
                               torch.ones(h * nb, dtype=torch.long))
    return shared, shared_entry, rest, rest_entry


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


def _attend_entries(q_entries: torch.Tensor, bounds: torch.Tensor, entry: torch.Tensor, kv_of_entry: torch.Tensor,
                    keys: KeySource, lo: int, hi: int, scale: float, batch_keys: int):
    """q_entries [E, rows, D]: each entry's queries; bounds/entry: its key ranges (entry order), clipped to the
    segment's keys [lo, hi) -> out [E, rows, D], lse [E, rows] (entries without keys: 0 and -inf), or None."""
    num, rows, d = q_entries.shape
    clipped = torch.stack([bounds[:, 0].clamp(min=lo), bounds[:, 1].clamp(max=hi)], 1)
    keep = clipped[:, 1] > clipped[:, 0]
    if not bool(keep.any()):
        return None
    hkv, num_slots = keys.k.shape[:2]
    k_flat, v_flat = keys.k.view(hkv * num_slots, d), keys.v.view(hkv * num_slots, d)  # supports(): contiguous
    pos, entry_len, entry_first = _expand(clipped[keep], entry[keep], num)
    slots = pos + keys.slots.start if isinstance(keys.slots, slice) else keys.slots.cpu()[pos]
    out = torch.zeros(num, rows, d, dtype=q_entries.dtype, device=q_entries.device)
    lse = torch.full((num, rows), float("-inf"), device=q_entries.device)
    width = (entry_len + GROUP_PAD - 1) // GROUP_PAD * GROUP_PAD
    for batch in _batches((entry_len > 0).nonzero()[:, 0], width, batch_keys):
        w = int(width[batch[0]])
        j = torch.arange(w)
        # [B, w] index into pos; the padding repeats the entry's last key and is masked out
        at = entry_first[batch][:, None] + torch.minimum(j[None], entry_len[batch][:, None] - 1)
        flat = (kv_of_entry[batch][:, None] * num_slots + slots[at]).flatten().to(keys.k.device)
        k = k_flat.index_select(0, flat).view(len(batch), 1, w, d)
        v = v_flat.index_select(0, flat).view(len(batch), 1, w, d)
        if keys.k_scale is None:
            k, v = k.to(keys.dtype), v.to(keys.dtype)
        else:  # an int8 cache: the scales of the same slots (contiguous too)
            g = keys.k_scale.shape[-1]
            k = dequantize(k, keys.k_scale.view(-1, g).index_select(0, flat).view(len(batch), 1, w, g), keys.dtype)
            v = dequantize(v, keys.v_scale.view(-1, g).index_select(0, flat).view(len(batch), 1, w, g), keys.dtype)
        mask = None
        if bool((entry_len[batch] < w).any()):
            mask = torch.zeros(len(batch), 1, 1, w, device=q_entries.device)  # fp32 for bf16 queries too
            mask.masked_fill_((j[None] >= entry_len[batch][:, None])[:, None, None].to(q_entries.device),
                              float("-inf"))
        on = batch.to(q_entries.device)
        o, s = flash_cpu(q_entries.index_select(0, on)[:, None], k, v, 0.0, False, attn_mask=mask, scale=scale)
        out.index_copy_(0, on, o[:, 0].to(q_entries.dtype))
        lse.index_copy_(0, on, s[:, 0])
    return out, lse


def _chunk_rows(out: torch.Tensor, lse: torch.Tensor, h: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of consecutive rows, head-major: out [E, rows, D], lse [E, rows] -> [n, H, D], [n, H]. Rows past the
    entries (after the last full tile) read no keys here: 0 and -inf; padding rows past n are dropped."""
    d = out.shape[-1]
    out, lse = out.reshape(h, -1, d), lse.reshape(h, -1)
    if out.shape[1] < n:
        out = torch.nn.functional.pad(out, (0, 0, 0, n - out.shape[1]))
        lse = torch.nn.functional.pad(lse, (0, n - lse.shape[1]), value=float("-inf"))
    return out[:, :n].transpose(0, 1), lse[:, :n].t()


def batched_sparse_attention(segments: list[tuple[int, int, torch.Tensor]], keys: KeySource, plan: Plan,
                             q_start: int, block: int, scale: float, batch_keys: int = BATCH_KEYS,
                             tile: int = TILE_BLOCKS, own=own_blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_attention() (kernel.py), the same inputs and result, in batched calls.
    segments: (lo, hi, q [n, H, D]) -> out [n, H, D], lse [n, H] (fp32)."""
    q0 = segments[0][2]
    n, h, d = q0.shape
    if not supports(keys, q0.device):
        return sparse_attention(segments, keys, plan, q_start, block, scale, own=own)
    hkv = keys.k.shape[0]
    nb = len(block_starts(q_start, n, block))
    nt = nb // tile if tile > 1 else 0
    own_out, own_lse = own(segments, keys, q_start, block, scale)
    bounds, entry = plan_bounds(plan)  # entry e = head * nb + block
    if nt:
        shared, shared_entry, bounds, entry = split_tiles(bounds, entry, h, nb, tile)
    kv_of_block = torch.arange(h).repeat_interleave(nb) // (h // hkv)
    kv_of_tile = torch.arange(h).repeat_interleave(nt) // (h // hkv)
    outs, lses = [own_out], [own_lse]
    for lo, hi, q in segments:
        # queries as [H, nb * block, D] (the last block's missing rows zero, their results dropped); entry e of
        # the blocks is row block e of [H * nb, block, D], of the tiles row tile e of [H * nt, tile * block, D]
        q_rows = torch.nn.functional.pad(q.transpose(0, 1), (0, 0, 0, nb * block - n))
        parts = [_attend_entries(q_rows.reshape(h * nb, block, d), bounds, entry, kv_of_block, keys, lo, hi, scale,
                                 batch_keys)]
        if nt:
            q_tiles = q_rows[:, :nt * tile * block].reshape(h * nt, tile * block, d)
            parts.append(_attend_entries(q_tiles, shared, shared_entry, kv_of_tile, keys, lo, hi, scale, batch_keys))
        for part in filter(None, parts):
            out, lse = _chunk_rows(*part, h, n)
            outs.append(out)
            lses.append(lse)
    return merge_attention(outs, lses)
