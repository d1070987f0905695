"""Attention over the paged KV cache for one engine step.

The model runner fills an AttentionMetadata per step; every layer's attention call writes the step's new keys
and values into the cache and computes, per sequence, attention of its new queries over all its keys.
Per sequence, with c tokens already cached and n new ones:
  c == 0        the chunk attends to itself, causal
  n == 1        decode: the token attends to the c + 1 cached keys
  otherwise     earlier keys (non-causal) + the chunk itself (causal), merged by log-sum-exp
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megactx.attention.attention_probe import AttentionProbe
from megactx.attention.context_parallel import ContextParallel
from megactx.attention.dense import attention
from megactx.attention.kv_quant import SCALE_DTYPE, num_groups, quantize
from megactx.attention.merge import merge_attention
from megactx.attention.sparse.kernel import KeySource
from megactx.attention.sparse.pooled import GROUP
from megactx.attention.sparse.prefill import OwnedKeys, SparsePrefill


@dataclass(slots=True)
class SeqAttention:
    q_start: int  # first row of this sequence's new tokens in the flattened batch
    num_new: int  # n
    num_computed: int  # c: tokens already in the cache before this step
    key_slots: torch.Tensor | slice  # cache slots of positions [0, c + n): a slice when contiguous
    sparse: bool = False  # a prefill chunk of a prompt long enough for sparse prefill
    prompt_len: int = 0  # the sequence's prompt tokens (sparse prefill keeps the prompt's last rows dense)
    seq_id: int = -1  # the engine's sequence id (-1: none; sparse prefill then keeps nothing across chunks)


@dataclass(slots=True)
class AttentionMetadata:
    seqs: list[SeqAttention]
    slot_mapping: torch.Tensor | slice  # [T] cache slot of each new token (a slice when consecutive)


class KVCacheTensors:
    """Per layer: k, v of [Hkv, num_slots, D]; the slot axis inside each head keeps a sequence contiguous.
    dtype int8: k, v hold int8 and k_scale, v_scale [Hkv, num_slots, 1] one scale per head vector (kv_quant.py);
    reads return them dequantized."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_kv_heads, num_slots, head_dim)
        # empty, not zeros: pages are touched only as tokens are written (RSS grows with use)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.dtype = dtype
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            shape = (num_kv_heads, num_slots, num_groups(head_dim))
            self.k_scale = [torch.empty(shape, dtype=SCALE_DTYPE, device=device) for _ in range(num_layers)]
            self.v_scale = [torch.empty(shape, dtype=SCALE_DTYPE, device=device) for _ in range(num_layers)]

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every per-layer tensor by name (a block's copy on disk holds each of them)."""
        out = {"k": self.k, "v": self.v}
        if self.k_scale is not None:
            out.update(k_scale=self.k_scale, v_scale=self.v_scale)
        return out

    def write(self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [T] or a slice (a plain copy, much cheaper than index_put), k/v: [T, Hkv, D]
        if self.k_scale is None:
            self.k[layer][:, slots] = k.transpose(0, 1).to(self.dtype)
            self.v[layer][:, slots] = v.transpose(0, 1).to(self.dtype)
            return
        self.k[layer][:, slots], self.k_scale[layer][:, slots] = quantize(k.transpose(0, 1))
        self.v[layer][:, slots], self.v_scale[layer][:, slots] = quantize(v.transpose(0, 1))

    def read(self, layer: int, slots: torch.Tensor | slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # -> k, v: [Hkv, m, D]; a view when slots is a slice and the dtype matches
        return self.source(layer, slots, dtype).span_all()

    def source(self, layer: int, slots: torch.Tensor | slice, dtype: torch.dtype) -> KeySource:
        """The keys of one sequence (slots: its positions' slots) in one layer, read in dtype."""
        if self.k_scale is None:
            return KeySource(self.k[layer], self.v[layer], slots, dtype)
        return KeySource(self.k[layer], self.v[layer], slots, dtype, self.k_scale[layer], self.v_scale[layer])


class DenseAttentionBackend:
    """Plain causal attention over the cache; with `sparse`, prefill chunks of long prompts run sparse. With `cp`
    (context parallelism, context_parallel.py) the layers give this rank's rows only, and each row's attention
    is merged from every rank's keys."""
    rotates_queries = False  # the model rotates queries and keys alike

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, cache: KVCacheTensors,
                 sparse: SparsePrefill | None = None, cp: ContextParallel | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.cache, self.sparse, self.cp = cache, sparse, cp
        self.meta: AttentionMetadata | None = None
        self.attention_probe: AttentionProbe | None = None  # attention_probe.py, one process only

    def begin_step(self, meta: AttentionMetadata, positions: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """Once per engine step, before the layers: the step's sequences; positions [T] of the new tokens, totals
        [T] the length of each one's sequence after the step. -> the positions the keys are rotated (and cached)
        at: their own here."""
        self.meta = meta
        self.split_rows(positions)
        return positions

    def split_rows(self, positions: torch.Tensor) -> None:
        """Context parallelism: the step's rows this rank computes (own: their indices) and their cache slots."""
        if self.cp is None:
            return
        self.owners = self.cp.owners(positions)
        self.own = (self.owners == self.cp.rank).nonzero()[:, 0]
        slots = self.meta.slot_mapping
        if isinstance(slots, slice):
            slots = torch.arange(slots.start, slots.stop, device=positions.device)
        self.own_slots = slots[self.own.to(slots.device)]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D], k/v: [T, Hkv, D] -> out [T, H, D]
        if self.cp is not None:
            return self.call_context_parallel(layer, q, k, v)
        meta = self.meta
        self.cache.write(layer, meta.slot_mapping, k, v)
        if self.attention_probe is not None:
            self.probe_rows(layer, [q])
        outs = []
        for s in meta.seqs:
            rows = slice(s.q_start, s.q_start + s.num_new)
            outs.append(self.attend_sequence(layer, s, q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1)))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend_sequence(self, layer: int, s: SeqAttention, q: torch.Tensor, k_new: torch.Tensor,
                        v_new: torch.Tensor) -> torch.Tensor:
        # q: [n, H, D], k_new/v_new: [Hkv, n, D] -> [n, H, D]
        if s.sparse and s.num_new > 1:
            c, outs = s.num_computed, []
            end = self.sparse.cfg.sparse_end(c, c + s.num_new, s.prompt_len)
            for lo, hi in self.sparse.cfg.parts(c, end) if end > c else ():  # each planned from its own last queries
                qp = q[lo - c:hi - c]
                r = min(self.sparse.cfg.last_q, hi - lo)
                outs.append(self.sparse_rows(layer, s, lo, hi, [qp], [(0, hi, qp)], [(0, hi, qp[-r:])])[0])
            if end < c + s.num_new:  # the prompt's dense tail
                outs.append(self.dense_rows(layer, s, end, c + s.num_new, [q[end - c:]])[0])
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if s.num_new == 1:
            k, v = self.cache.read(layer, s.key_slots, q.dtype)
            return attention(q, k, v, self.scale, causal=False)[0]
        return self.attend_dense(layer, s, q, k_new, v_new)[0]

    def sparse_rows(self, layer: int, s: SeqAttention, a: int, b: int, queries: list[torch.Tensor],
                    segments: list, estimate: list,
                    dca_parts: list[tuple[int, int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) of a prefill chunk by sparse prefill (SparsePrefill.attend's segments and estimate);
        queries: what dense_rows takes for the same rows. -> out [n, H, D], lse [n, H]. A plan too dense to gain is
        computed densely. With a probe that compares this layer, the dense attention of the same rows is computed
        and timed as well. Context parallelism: over this rank's keys (fp32 out), the plan the same on every rank."""
        keys = self.keys(layer, s, queries[0].dtype)
        owned = self.owned_keys(layer, s) if self.cp is not None else None
        result = self.sparse.attend(layer, segments, estimate, keys, a, dca_parts, owned, seq_id=s.seq_id)
        probe = self.sparse.probe
        if result is None:
            t0 = time.perf_counter()
            result = self.dense_rows(layer, s, a, b, queries) if owned is None else self.owned_rows(
                layer, s, a, b, queries)
            if probe is not None:
                probe.calls[-1].attention_s += time.perf_counter() - t0
        if probe is not None and owned is None and probe.compares(layer):
            t0 = time.perf_counter()
            _, lse_dense = self.dense_rows(layer, s, a, b, queries)
            probe.add_dense(result[1], lse_dense, time.perf_counter() - t0)
        return result

    def dense_rows(self, layer: int, s: SeqAttention, a: int, b: int,
                   queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) densely, their own keys read back from the cache -> out [n, H, D], lse [n, H]."""
        k_own, v_own = self.keys(layer, s, queries[0].dtype).span(a, b)
        return self.attend_dense(layer, s, queries[0], k_own, v_own, start=a)

    def attend_dense(self, layer: int, s: SeqAttention, q: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # rows at positions [start, start + n) of a prefill chunk (default: all of it), k_new/v_new their own keys:
        # earlier keys (non-causal) and the rows themselves (causal) -> out [n, H, D], lse [n, H]
        start = s.num_computed if start is None else start
        own = attention(q, k_new, v_new, self.scale, causal=True)
        if start == 0:
            return own
        k, v = self.cache.read(layer, _prefix(s.key_slots, start), q.dtype)
        past = attention(q, k, v, self.scale, causal=False)
        return merge_attention([past[0], own[0]], [past[1], own[1]])

    def keys(self, layer: int, s: SeqAttention, dtype: torch.dtype) -> KeySource:
        return self.cache.source(layer, s.key_slots, dtype)

    # ---- the attention probe (attention_probe.py) ---------------------------------------------------------
    def probe_rows(self, layer: int, queries: list[torch.Tensor]) -> None:
        """queries: the step's, as row_probabilities takes them [T, H, D]: the probe's row, if this step has it."""
        probe = self.attention_probe
        for s in self.meta.seqs:
            p = probe.row_of(s.prompt_len)
            if s.num_computed <= p < s.num_computed + s.num_new:
                i = s.q_start + p - s.num_computed
                probe.add(layer, self.row_probabilities(layer, s, [x[i] for x in queries], p))

    def row_probabilities(self, layer: int, s: SeqAttention, queries: list[torch.Tensor], p: int) -> torch.Tensor:
        """The row at position p (queries: [H, D]) over every key at or before it -> probabilities [H, p + 1]."""
        k, _ = self.cache.read(layer, _prefix(s.key_slots, p + 1), torch.float32)
        return self.row_scores(queries[0], k).softmax(-1)

    def row_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # q: [H, D], k: [Hkv, m, D] -> [H, m] fp32, scaled
        rep = q.shape[0] // k.shape[0]
        return torch.einsum("hd,hmd->hm", q.float(), k.float().repeat_interleave(rep, 0)) * self.scale

    # ---- context parallelism -----------------------------------------------------------------------------
    def call_context_parallel(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T_r, H, D], k/v: [T_r, Hkv, D] of this rank's rows -> out [T_r, H, D]
        self.cache.write(layer, self.own_slots, k, v)
        queries = self.step_queries(self.cp.gather_rows(q, self.owners))  # every row's
        outs, lses = [], []
        for s in self.meta.seqs:
            rows = slice(s.q_start, s.q_start + s.num_new)
            out, lse = self.owned_sequence(layer, s, [x[rows] for x in queries])
            outs.append(out)
            lses.append(lse)
        if len(outs) > 1:
            outs, lses = [torch.cat(outs)], [torch.cat(lses)]
        return self.cp.combine(outs[0], lses[0], self.own)

    def step_queries(self, q: torch.Tensor) -> list[torch.Tensor]:
        """The step's queries [T, H, D] as the attention reads them (DCA: three rotations)."""
        return [q]

    def owned_sequence(self, layer: int, s: SeqAttention,
                       queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's rows over the keys this rank holds -> out [n, H, D] fp32, lse [n, H]; a long prompt's
        rows by sparse prefill as attend_sequence, each rank computing the plan's keys it holds."""
        c, n = s.num_computed, s.num_new
        if not (s.sparse and n > 1):
            return self.owned_rows(layer, s, c, c + n, queries)
        end = self.sparse.cfg.sparse_end(c, c + n, s.prompt_len)
        parts = []
        for lo, hi in self.sparse.cfg.parts(c, end) if end > c else ():
            qp = queries[0][lo - c:hi - c]
            r = min(self.sparse.cfg.last_q, hi - lo)
            parts.append(self.sparse_rows(layer, s, lo, hi, [qp], [(0, hi, qp)], [(0, hi, qp[-r:])]))
        if end < c + n:  # the prompt's dense tail
            parts.append(self.owned_rows(layer, s, end, c + n, [q[end - c:] for q in queries]))
        return cat_rows(parts)

    def owned_rows(self, layer: int, s: SeqAttention, a: int, b: int,
                   queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) densely over this rank's keys -> out [n, H, D] fp32, lse [n, H]."""
        return self.attend_owned(layer, s, queries[0], a, 0, b)

    def owned_keys(self, layer: int, s: SeqAttention) -> OwnedKeys:
        """What sparse prefill needs to plan and compute this rank's part (sparse/prefill.py)."""
        def own_blocks(segments, keys, q_start: int, block: int, scale: float):
            # each query block over the keys of its own block this rank holds, causal
            n = segments[0][2].shape[0]
            parts = []
            for a in range(q_start, q_start + n, block):
                b = min(a + block, q_start + n)
                q = next(q for lo, hi, q in segments if lo <= a < hi)
                parts.append(self.attend_owned(layer, s, q[a - q_start:b - q_start], a, a, b))
            return cat_rows(parts)
        return OwnedKeys(lambda means: self.cp.share_group_means(means, GROUP), self.cp.clip, own_blocks)

    def attend_owned(self, layer: int, s: SeqAttention, q: torch.Tensor, a: int, lo: int,
                     hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at positions [a, a + n) over this rank's keys in [lo, hi) (hi <= a + n), each row seeing the keys
        at or before its position -> out [n, H, D] fp32, lse [n, H] (-inf where a row sees none of them)."""
        n = q.shape[0]
        before, pieces = [], []  # spans every row sees whole; (rows, out, lse)
        for x, y in self.cp.own_spans(lo, hi):
            if x < a:
                before.append((x, min(y, a)))
            for u in ((max(x, a),) if y > a else ()):  # keys among the rows' own positions
                k, v = self.cache.read(layer, span_slots(s.key_slots, [(u, y)]), q.dtype)
                pieces.append((slice(u - a, y - a), *attention(q[u - a:y - a], k, v, self.scale, causal=True)))
                if y - a < n:
                    pieces.append((slice(y - a, n), *attention(q[y - a:], k, v, self.scale, causal=False)))
        if before:
            k, v = self.cache.read(layer, span_slots(s.key_slots, before), q.dtype)
            pieces.append((slice(0, n), *attention(q, k, v, self.scale, causal=False)))
        outs, lses = [], []
        for rows, out, lse in pieces:
            if rows != slice(0, n):
                out = torch.zeros_like(q).index_copy_(0, torch.arange(rows.start, rows.stop), out)
                lse = torch.full((n, q.shape[1]), float("-inf")).index_copy_(
                    0, torch.arange(rows.start, rows.stop), lse)
            outs.append(out)
            lses.append(lse)
        if not outs:
            return torch.zeros(q.shape), torch.full((n, q.shape[1]), float("-inf"))
        return merge_attention(outs, lses, out_dtype=torch.float32)


def cat_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of consecutive row ranges -> of all the rows."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def span_slots(slots: torch.Tensor | slice, spans: list[tuple[int, int]]) -> torch.Tensor | slice:
    """The cache slots of positions in the spans [(lo, hi), ...], in order: a slice for one span of a slice."""
    if len(spans) == 1 and isinstance(slots, slice):
        return slice(slots.start + spans[0][0], slots.start + spans[0][1])
    pos = torch.cat([torch.arange(lo, hi) for lo, hi in spans])
    return pos + slots.start if isinstance(slots, slice) else slots[pos.to(slots.device)]


def _prefix(slots: torch.Tensor | slice, n: int) -> torch.Tensor | slice:
    if isinstance(slots, slice):
        return slice(slots.start, slots.start + n)
    return slots[:n]
