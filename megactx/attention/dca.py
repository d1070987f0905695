"""Dual Chunk Attention (An et al. 2024, arXiv 2402.17463; Qwen2.5-1M, arXiv 2501.15383) with a YaRN-style
attention temperature applied on the query side.

A model never sees a relative distance it was not trained on: keys are rotated at p % L (L = chunk_size -
local_size, the real chunk length), and a query at position p attends three key ranges with three rotations:
  intra       keys [cur, p]        causal        query at p % L                  (cur = (p // L) * L)
  successive  keys [cur - L, cur)  non-causal    query at min(p % L + L, chunk_size)
  inter       keys [0, cur - L)    non-causal    query at min(2L - 1, chunk_size)  (a constant)
The parts are merged by log-sum-exp in fp32, which equals one softmax over the concatenated scores. For a
sequence of at most chunk_size + 1 tokens every query and key sits at its true position: plain RoPE.

Temperature: logits x factor^2 with factor = max(1, 0.1 ln(x / original_max_position_embeddings) + 1), applied by
scaling the queries, so cached keys never depend on the total length. x is the query position + 1 ("position":
queries inside the trained length see exactly the trained model), the sequence's current total length ("total"),
or the factor is 1 ("none"; the default unless the model's config declares DCA, see DCAConfig.resolve). vLLM instead
multiplies the cached keys by the total-length factor, which makes a cached prefix wrong as soon as the sequence
grows.

The fast path computes each part with the dense kernel over slices of the paged cache (no Python loop over heads
or tokens); reference_dual_chunk_attention() builds the full score matrix and is the tests' oracle.
"""
from __future__ import annotations

import torch

from megactx.attention.backend import DenseAttentionBackend, KVCacheTensors, SeqAttention, cat_rows
from megactx.attention.context_parallel import ContextParallel
from megactx.attention.dca_distances import query_positions
from megactx.attention.dense import attention
from megactx.attention.merge import merge_attention
from megactx.attention.sparse.prefill import SparsePrefill
from megactx.config import DCAConfig
from megactx.layers.rotary import apply_rotary


def temperature_scale(positions: torch.Tensor, totals: torch.Tensor, cfg: DCAConfig) -> torch.Tensor | None:
    # positions, totals: [T] -> the logit multiplier factor^2 per query row [T] fp32, or None (all ones)
    if cfg.temperature == "none":
        return None
    x = (positions + 1 if cfg.temperature == "position" else totals).double()
    factor = torch.clamp(0.1 * torch.log(x / cfg.original_max_position) + 1, min=1.0)
    if bool((factor == 1).all()):
        return None
    return (factor * factor).float()


class DualChunkAttentionBackend(DenseAttentionBackend):
    """cfg: resolved DCA settings (DCAConfig.resolve). The layer rotates only the keys (at p % L, the positions
    begin_step returns); the queries are rotated here, three ways."""
    rotates_queries = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, cache: KVCacheTensors, cfg: DCAConfig,
                 rotary, sparse: SparsePrefill | None = None, cp: ContextParallel | None = None):
        super().__init__(num_heads, num_kv_heads, head_dim, cache, sparse, cp)
        self.cfg, self.rotary = cfg, rotary

    def begin_step(self, meta, positions: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """Also, once per step: cos/sin of the three query positions and the temperature of every row."""
        self.meta = meta
        self.split_rows(positions)
        intra, succ, inter = query_positions(positions, self.cfg)
        self.tables = [self.rotary.cos_sin(p) for p in (intra, succ, inter)]
        self.q_scale = temperature_scale(positions, totals, self.cfg)
        return positions % self.cfg.chunk_len

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D] not rotated, k: [T, Hkv, D] rotated at p % L, v: [T, Hkv, D] -> [T, H, D]
        if self.cp is not None:
            return self.call_context_parallel(layer, q, k, v)
        meta = self.meta
        self.cache.write(layer, meta.slot_mapping, k, v)
        *queries, q = self.step_queries(q)  # 3 x [T, H, D] and the unrotated queries, temperature applied
        if self.attention_probe is not None:
            self.probe_rows(layer, queries)
        outs = []
        for s in meta.seqs:
            rows = slice(s.q_start, s.q_start + s.num_new)
            outs.append(self.attend_dca(layer, s, [x[rows] for x in queries], q[rows],
                                        k[rows].transpose(0, 1), v[rows].transpose(0, 1)))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend_dca(self, layer: int, s: SeqAttention, queries: list[torch.Tensor], q_raw: torch.Tensor,
                   k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        # queries: 3 x [n, H, D] for absolute positions [c, c + n), q_raw: [n, H, D] not rotated;
        # split where p crosses a multiple of L
        L, c, n = self.cfg.chunk_len, s.num_computed, s.num_new
        sparse_end = self.sparse.cfg.sparse_end(c, c + n, s.prompt_len) if s.sparse else c
        pieces, start = [], c
        while start < c + n:
            end = min(c + n, (start // L + 1) * L)
            rows = slice(start - c, end - c)
            if s.sparse and end - start > 1:
                mid = max(start, min(end, sparse_end))
                for lo, hi in self.sparse.cfg.parts(start, mid) if mid > start else ():  # each from its own queries
                    part = slice(lo - c, hi - c)
                    pieces.append(self.sparse_piece(layer, s, lo, hi, [x[part] for x in queries], q_raw[part])[0])
                if mid < end:  # the prompt's dense tail
                    tail = slice(mid - c, end - c)
                    pieces.append(self.dense_rows(layer, s, mid, end, [x[tail] for x in queries])[0])
            else:
                pieces.append(self.attend_piece(layer, s, start, end, [x[rows] for x in queries],
                                                k_new[:, rows], v_new[:, rows]))
            start = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def step_queries(self, q: torch.Tensor) -> list[torch.Tensor]:
        """[T, H, D] not rotated -> the intra, successive and inter rotations and the unrotated queries, each
        with the temperature."""
        if self.q_scale is not None:
            q = q * self.q_scale[:, None, None].to(q.dtype)  # the fp32 factors would promote a bf16 model
        return [apply_rotary(q, cos, sin) for cos, sin in self.tables] + [q]

    def owned_sequence(self, layer: int, s: SeqAttention,
                       queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context parallelism: the rows over this rank's keys, each DCA part with its rotation; a long prompt's
        rows by sparse prefill as attend_dca. queries: the three rotations and the unrotated queries."""
        L, c, n = self.cfg.chunk_len, s.num_computed, s.num_new
        sparse_end = self.sparse.cfg.sparse_end(c, c + n, s.prompt_len) if s.sparse else c
        parts, start = [], c
        while start < c + n:  # pieces split where p crosses a multiple of L, as attend_dca
            end = min(c + n, (start // L + 1) * L)
            mid = max(start, min(end, sparse_end)) if end - start > 1 else start
            for lo, hi in self.sparse.cfg.parts(start, mid) if mid > start else ():
                rows = slice(lo - c, hi - c)
                parts.append(self.sparse_piece(layer, s, lo, hi, [x[rows] for x in queries[:3]], queries[3][rows]))
            if mid < end:
                parts.append(self.owned_rows(layer, s, mid, end, [x[mid - c:end - c] for x in queries]))
            start = end
        return cat_rows(parts)

    def owned_rows(self, layer: int, s: SeqAttention, a: int, b: int,
                   queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) of one DCA chunk densely over this rank's keys, the three parts merged (fp32)."""
        L = self.cfg.chunk_len
        cur = (a // L) * L
        prev = max(cur - L, 0)
        parts = [self.attend_owned(layer, s, q, a, lo, hi)
                 for q, (lo, hi) in zip(queries, ((cur, b), (prev, cur), (0, prev))) if hi > lo]
        return merge_attention([p[0] for p in parts], [p[1] for p in parts], out_dtype=torch.float32)

    def row_probabilities(self, layer: int, s: SeqAttention, queries: list[torch.Tensor], p: int) -> torch.Tensor:
        """The row at position p over every key at or before it, each DCA part scored with its rotation (queries:
        intra, successive, inter, [H, D] each), one softmax -> [H, p + 1]."""
        L = self.cfg.chunk_len
        cur = (p // L) * L
        prev = max(cur - L, 0)
        k, _ = self.cache.read(layer, _range(s.key_slots, 0, p + 1), torch.float32)
        parts = ((0, prev, queries[2]), (prev, cur, queries[1]), (cur, p + 1, queries[0]))  # in key order
        return torch.cat([self.row_scores(q, k[:, lo:hi]) for lo, hi, q in parts], -1).softmax(-1)

    def attend_piece(self, layer: int, s: SeqAttention, a: int, b: int, queries: list[torch.Tensor],
                     k_own: torch.Tensor, v_own: torch.Tensor) -> torch.Tensor:
        return self.attend_piece_lse(layer, s, a, b, queries, k_own, v_own)[0]

    def attend_piece_lse(self, layer: int, s: SeqAttention, a: int, b: int, queries: list[torch.Tensor],
                         k_own: torch.Tensor, v_own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # rows at positions [a, b), all in the chunk starting at cur; k_own/v_own: the keys at [a, b)
        L = self.cfg.chunk_len
        cur = (a // L) * L
        q_intra, q_succ, q_inter = queries
        # one row (decode) sees its own key non-causally: the intra part reads it from the cache, one call less
        intra_end = b if b - a == 1 else a
        outs, lses = [], []
        for part_q, lo, hi in ((q_intra, cur, intra_end), (q_succ, max(cur - L, 0), cur),
                               (q_inter, 0, max(cur - L, 0))):
            if hi > lo:  # cached keys at [lo, hi), all before the rows (or the one row itself): non-causal
                k, v = self.cache.read(layer, _range(s.key_slots, lo, hi), part_q.dtype)
                o, lse = attention(part_q, k, v, self.scale, causal=False)
                outs.append(o)
                lses.append(lse)
        if intra_end == a:
            o, lse = attention(q_intra, k_own, v_own, self.scale, causal=True)  # the piece itself
            outs.append(o)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return merge_attention(outs, lses)

    def sparse_piece(self, layer: int, s: SeqAttention, a: int, b: int, queries: list[torch.Tensor],
                     q_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse prefill of rows [a, b) (one DCA chunk): the planned keys split into the three parts, each scored
        with its own query rotation; the pattern is estimated from the last queries at the critical (continuous)
        positions p % L + L and p % L + chunk_size for the successive and inter keys, as Qwen2.5-1M does."""
        L, cfg = self.cfg.chunk_len, self.cfg
        cur = (a // L) * L
        prev = max(cur - L, 0)
        parts = [(cur, b), (prev, cur), (0, prev)]
        segments = [(lo, hi, q) for (lo, hi), q in zip(parts, queries) if hi > lo]
        r = min(self.sparse.cfg.last_q, b - a)
        intra = torch.arange(b - r, b, device=q_raw.device) % L
        critical = [queries[0][-r:]] + [apply_rotary(q_raw[-r:], *self.rotary.cos_sin(intra + shift))
                                        for shift in (L, cfg.chunk_size)]
        estimate = [(lo, hi, q) for (lo, hi), q in zip(parts, critical) if hi > lo]
        return self.sparse_rows(layer, s, a, b, queries, segments, estimate,
                                dca_parts=[p for p in parts[1:] if p[1] > p[0]])

    def dense_rows(self, layer: int, s: SeqAttention, a: int, b: int,
                   queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) of one DCA chunk densely, the three parts merged -> out [n, H, D], lse [n, H]."""
        return self.attend_piece_lse(layer, s, a, b, queries, *self.keys(layer, s, queries[0].dtype).span(a, b))


def _range(slots: torch.Tensor | slice, lo: int, hi: int) -> torch.Tensor | slice:
    if isinstance(slots, slice):
        return slice(slots.start + lo, slots.start + hi)
    return slots[lo:hi]


def reference_dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary, cfg: DCAConfig,
                                   scale: float, q_scale: torch.Tensor | None = None,
                                   mask: torch.Tensor | None = None, return_probs: bool = False):
    """The oracle: one sequence, all positions 0..T-1, every score written out.
    q: [T, H, D], k, v: [T, Hkv, D], none rotated -> [T, H, D] (and the probabilities [H, T, T] with return_probs).
    Scores of each (query, key) pair come from the part the key falls in, then one softmax per row."""
    t, h, d = q.shape
    hkv = k.shape[1]
    pos = torch.arange(t)
    if q_scale is not None:
        q = q * q_scale[:, None, None]
    kr = apply_rotary(k.float(), *rotary.cos_sin(pos % cfg.chunk_len))  # [T, Hkv, D]
    kr = kr.repeat_interleave(h // hkv, dim=1)
    vr = v.float().repeat_interleave(h // hkv, dim=1)
    scores = [torch.einsum("qhd,khd->hqk", apply_rotary(q.float(), *rotary.cos_sin(p)), kr) * scale
              for p in query_positions(pos, cfg)]  # 3 x [H, T, T]
    L = cfg.chunk_len
    cur = (pos // L * L)[:, None]
    j = pos[None, :]
    part = torch.full((t, t), -1)
    part[(j >= cur) & (j <= pos[:, None])] = 0
    part[(j >= cur - L) & (j < cur)] = 1
    part[j < cur - L] = 2
    s = torch.where(part == 0, scores[0], torch.where(part == 1, scores[1], scores[2]))
    s = s.masked_fill(part == -1, float("-inf"))
    if mask is not None:  # [H, T, T] bool: sparse prefill's oracle, only these pairs
        s = s.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, vr).to(q.dtype)
    return (out, probs) if return_probs else out
