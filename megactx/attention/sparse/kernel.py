"""Sparse prefill attention on the planned keys (plan.py), with the log-sum-exp, so it merges with DCA parts and
earlier chunks.

Why gathered keys and the dense kernel: on a CPU, SDPA with an explicit mask falls back to a slow path and
FlexAttention was 2.2x slower than dense SDPA. Calling the flash kernel (non-causal, it returns the
LSE) on each wide planned span (a strided view of the cache) and once on the block's other keys, its columns
and narrow spans gathered into one tile, computes only the chosen keys at near-peak speed. A call over a few
hundred keys runs at half the kernel's speed or less, and scattered slashes make many such spans. Profiled on
a synthetic 8K-row piece: gathering cut the time inside flash calls from 5.4 to 3.8 s (17017 calls to 901)
for 0.6 s of copies (the kernel studies in benchmarks/STUDIES.md). The Python loop is over (head, query
block), each call hundreds of rows by thousands of keys; the parts merge by their LSE.

Taller calls where the plan allows: torch's CPU flash kernel splits the queries into 256-row tiles when a call
has at least 768 rows and into 64-row tiles below. Measured on an AVX512 CPU (2 threads, one head, 1K-8K keys,
fp32): 256-row calls ran at 0.66-0.70 Gpair/s, 1024-row calls at 0.84-0.87, 768-row calls at 0.61-0.64 (three
tiles on two threads). So the keys that all blocks of a tile of TILE_BLOCKS consecutive blocks read (a wide slash
band: each block's range is the last one's shifted by one block, and most of it overlaps) are computed once for
the tile's rows, and each block computes only the rest. The keys every block of the chunk reads (an A-shape
head's sinks, columns before the chunk) are one call over all rows. Every key of the plan is computed
exactly once for each row that plans it, so the result is the plan's, whatever the grouping.
Only spans of MIN_SHARED_BLOCKS blocks or wider are shared: on an AVX2 CPU the gap between call heights is small
(256 rows 0.45, 1024 rows 0.46-0.51 Gpair/s), and also gathering a pooled plan's narrower shared keys (a quarter
of a block's pairs) into one call per tile left a 30K piece's layer as fast as before (1.61 against 1.62 s).
"""
from __future__ import annotations

import torch

from megactx.attention.dense import attention
from megactx.attention.kv_quant import dequantize
from megactx.attention.merge import merge_attention
from megactx.attention.sparse.plan import BlockKeys, Plan, block_starts

TILE_BLOCKS = 4  # 4 x 256 = 1024-row calls: the flash kernel's 256-row tiles, an even number of them
MIN_SHARED_BLOCKS = 2  # a tile computes a shared span once when it is at least this many blocks wide
MIN_VIEW_BLOCKS = 8  # narrower spans are gathered with the columns into one call (8 x 256 = 2048 keys)


class KeySource:
    """One sequence's keys and values in the paged cache: k, v [Hkv, slots, D] and the slots of positions 0...
    An int8 cache gives k_scale, v_scale [Hkv, slots, 1] too: what is read is dequantized (kv_quant.py)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | slice, dtype: torch.dtype,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
        self.k, self.v, self.slots, self.dtype = k, v, slots, dtype
        self.k_scale, self.v_scale = k_scale, v_scale

    def _read(self, heads, s) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale is None:
            return self.k[heads, s].to(self.dtype), self.v[heads, s].to(self.dtype)
        return (dequantize(self.k[heads, s], self.k_scale[heads, s], self.dtype),
                dequantize(self.v[heads, s], self.v_scale[heads, s], self.dtype))

    def _slots(self, lo: int, hi: int) -> torch.Tensor | slice:
        return slice(self.slots.start + lo, self.slots.start + hi) if isinstance(self.slots, slice) else self.slots[lo:hi]

    def keys(self, lo: int, hi: int, raw: bool = False) -> torch.Tensor:
        """k [Hkv, hi - lo, D] without the values (the estimates read none: at 1M keys of the 0.5B model, reading
        them cost a 0.5 GB fp32 copy a layer and chunk). raw: in the cache's own dtype (a view when the slots are
        contiguous), for readers that accumulate in fp32 themselves; an int8 cache is always dequantized."""
        s = self._slots(lo, hi)
        if self.k_scale is not None:
            return dequantize(self.k[:, s], self.k_scale[:, s], self.dtype)
        return self.k[:, s] if raw else self.k[:, s].to(self.dtype)

    def span_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        # -> k, v [Hkv, m, D] of all the slots
        return self._read(slice(None), self.slots)

    def span(self, lo: int, hi: int, kv_head: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # -> k, v [Hkv, hi - lo, D] (or [1, hi - lo, D] of one KV head): views when the slots are contiguous
        heads = slice(None) if kv_head is None else slice(kv_head, kv_head + 1)
        return self._read(heads, self._slots(lo, hi))

    def take(self, kv_head: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # idx: [m] positions -> k, v [1, m, D]
        slots = idx + self.slots.start if isinstance(self.slots, slice) else self.slots[idx]
        return self._read(slice(kv_head, kv_head + 1), slots.to(self.k.device))


def shared_keys(blocks: list[BlockKeys]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The spans and columns that every query block of a head reads (an A-shape head's sinks, the verticals before
    the chunk that no block's span covers): computed once for all the chunk's rows, in one tall efficient call."""
    counts: dict[tuple[int, int], int] = {}
    for b in blocks:
        for r in b.ranges:
            counts[r] = counts.get(r, 0) + 1
    ranges = sorted(r for r, c in counts.items() if c == len(blocks))
    values, seen = torch.unique(torch.cat([b.columns.cpu() for b in blocks]), return_counts=True)
    return ranges, values[seen == len(blocks)]


def intersect_spans(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint spans -> the sorted disjoint spans of keys in both."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract_spans(a: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint spans a minus the keys of the sorted disjoint spans cut."""
    out = []
    for lo, hi in a:
        for c_lo, c_hi in cut:
            if c_hi <= lo or c_lo >= hi:
                continue
            if c_lo > lo:
                out.append((lo, c_lo))
            lo = max(lo, c_hi)
            if lo >= hi:
                break
        if hi > lo:
            out.append((lo, hi))
    return out


def tile_shared_spans(ranges: list[list[tuple[int, int]]], min_width: int) -> list[tuple[int, int]]:
    """ranges: each block's spans in one tile -> the spans all of them read, those at least min_width wide."""
    if len(ranges) < 2:
        return []
    common = ranges[0]
    for r in ranges[1:]:
        common = intersect_spans(common, r)
    return [(lo, hi) for lo, hi in common if hi - lo >= min_width]


def _attend_spans(segments, head: int, rows: slice, spans, keys: KeySource, kv_head: int, scale: float,
                  outs: list, lses: list) -> None:
    """Each span, cut by the segments (DCA: the keys each rotation of the queries scores), for these rows."""
    for lo, hi, q in segments:
        q_rows = q[rows, head:head + 1]  # [r, 1, D]
        for s_lo, s_hi in spans:
            s_lo, s_hi = max(s_lo, lo), min(s_hi, hi)
            if s_hi > s_lo:
                o, s = attention(q_rows, *keys.span(s_lo, s_hi, kv_head), scale, causal=False)
                outs.append(o)
                lses.append(s)


def _attend_gathered(segments, head: int, rows: slice, idx: torch.Tensor, keys: KeySource, kv_head: int,
                     scale: float, outs: list, lses: list) -> None:
    """Single keys and short spans, gathered from the cache into one [1, len, D] tile per segment: one call
    instead of one per span (a call over few keys runs at half the kernel's speed or less)."""
    for lo, hi, q in segments:
        i = idx[(idx >= lo) & (idx < hi)] if len(segments) > 1 else idx
        if len(i):
            o, s = attention(q[rows, head:head + 1], *keys.take(kv_head, i), scale, causal=False)
            outs.append(o)
            lses.append(s)


def _gather_short(spans: list[tuple[int, int]], columns: torch.Tensor, min_view: int):
    """-> the spans read as views of the cache (at least min_view keys), the positions of all other keys."""
    short = [(lo, hi) for lo, hi in spans if hi - lo < min_view]
    return [(lo, hi) for lo, hi in spans if hi - lo >= min_view], torch.cat([span_positions(short), columns.cpu()])


def span_positions(spans: list[tuple[int, int]]) -> torch.Tensor:
    """[(lo, hi), ...] -> the positions lo..hi-1 of every span, in order: one arange and a per-span offset
    instead of an arange per span (a block has dozens of short spans, the kernel thousands of blocks)."""
    if not spans:
        return torch.empty(0, dtype=torch.long)
    bounds = torch.tensor(spans, dtype=torch.long)  # [S, 2]
    lengths = bounds[:, 1] - bounds[:, 0]
    shift = bounds[:, 0] - (lengths.cumsum(0) - lengths)  # position - index in the output, per span
    return torch.arange(int(lengths.sum())) + shift.repeat_interleave(lengths)


def own_blocks(segments, keys: KeySource, q_start: int, block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query block against its own keys, causal, all heads in one call -> out [n, H, D], lse [n, H]."""
    q0 = segments[0][2]
    n, h, _ = q0.shape
    own_out = torch.empty_like(q0)
    own_lse = torch.empty(n, h, dtype=torch.float32, device=q0.device)
    for a in block_starts(q_start, n, block):
        rows = slice(a - q_start, min(n, a - q_start + block))
        q_own = next(q for lo, hi, q in segments if lo <= a < hi)
        k_own, v_own = keys.span(a, q_start + rows.stop)
        own_out[rows], own_lse[rows] = attention(q_own[rows], k_own, v_own, scale, causal=True)
    return own_out, own_lse


def sparse_attention(segments: list[tuple[int, int, torch.Tensor]], keys: KeySource, plan: Plan, q_start: int,
                     block: int, scale: float, tile_blocks: int = TILE_BLOCKS,
                     min_view: float = MIN_VIEW_BLOCKS, own=own_blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """segments: (lo, hi, q [n, H, D]): planned keys in [lo, hi) are scored with these queries (one segment for
    plain attention; DCA's intra, successive and inter parts); the own block uses the segment holding it.
    own: computes the own blocks, as own_blocks() (context parallelism: over the keys one rank holds).
    -> out [n, H, D], lse [n, H] (fp32)."""
    q0 = segments[0][2]
    n, h, d = q0.shape
    group = h // keys.k.shape[0]
    starts = block_starts(q_start, n, block)
    row_blocks = [slice(a - q_start, min(n, a - q_start + block)) for a in starts]
    own_out, own_lse = own(segments, keys, q_start, block, scale)
    out = torch.empty_like(q0)
    lse = torch.empty(n, h, dtype=torch.float32, device=q0.device)
    for head in range(h):
        kv_head = head // group
        common_ranges, common_cols = shared_keys(plan[head])
        # full-height parts: [n, 1, D], [n, 1]. The tile and block parts are merged per tile or block into two
        # full-height fp32 buffers, and everything once per head: a per-block merge of all parts cost more than
        # the flash calls at low density (many small ops per block)
        head_outs, head_lses = [own_out[:, head:head + 1]], [own_lse[:, head:head + 1]]
        _attend_spans(segments, head, slice(0, n), common_ranges, keys, kv_head, scale, head_outs, head_lses)
        _attend_gathered(segments, head, slice(0, n), common_cols, keys, kv_head, scale, head_outs, head_lses)
        tile_part, block_part = _PartBuffer(n, d, q0.device), _PartBuffer(n, d, q0.device)
        for t0 in range(0, len(starts), tile_blocks):
            tile = range(t0, min(t0 + tile_blocks, len(starts)))
            ranges = [subtract_spans(plan[head][i].ranges, common_ranges) for i in tile]
            shared = tile_shared_spans(ranges, MIN_SHARED_BLOCKS * block)
            tile_rows = slice(row_blocks[tile[0]].start, row_blocks[tile[-1]].stop)
            outs, lses = [], []  # [tile rows, 1, D], [tile rows, 1]
            _attend_spans(segments, head, tile_rows, shared, keys, kv_head, scale, outs, lses)
            tile_part.put(tile_rows, outs, lses)
            for i, own_ranges in zip(tile, ranges):
                rows = row_blocks[i]
                outs, lses = [], []  # [block rows, 1, D], [block rows, 1]
                cols = plan[head][i].columns
                if len(common_cols):
                    cols = cols[~torch.isin(cols, common_cols.to(cols.device))]
                views, gathered = _gather_short(subtract_spans(own_ranges, shared), cols, min_view * block)
                _attend_spans(segments, head, rows, views, keys, kv_head, scale, outs, lses)
                _attend_gathered(segments, head, rows, gathered, keys, kv_head, scale, outs, lses)
                block_part.put(rows, outs, lses)
        for part in (tile_part, block_part):
            if part.out is not None:
                head_outs.append(part.out)
                head_lses.append(part.lse)
        out[:, head:head + 1], lse[:, head:head + 1] = merge_attention(head_outs, head_lses)
    return out, lse


class _PartBuffer:
    """Full-height fp32 out [n, 1, D] and lse [n, 1] of parts that cover some rows (empty rows: lse -inf,
    out 0, so they weigh nothing in the merge); allocated at the first part."""

    def __init__(self, n: int, d: int, device):
        self.n, self.d, self.device = n, d, device
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def put(self, rows: slice, outs: list[torch.Tensor], lses: list[torch.Tensor]) -> None:
        if not outs:
            return
        if self.out is None:
            self.out = torch.zeros(self.n, 1, self.d, dtype=torch.float32, device=self.device)
            self.lse = torch.full((self.n, 1), float("-inf"), device=self.device)
        self.out[rows], self.lse[rows] = merge_attention(outs, lses, out_dtype=torch.float32)
