"""Sparse prefill of one sequence's prefill rows: estimate each head's pattern, plan, compute (MInference).

Used by both attention backends for prompts longer than the threshold; decode and short prompts stay dense.
The keys of the rows are already in the cache, so the plan and the kernel read everything from there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from megactx.attention.sparse.batched import batched_sparse_attention, clip_plan
from megactx.attention.sparse.coarse import coarse_to_fine_scores
from megactx.attention.sparse.estimate import VerticalSlash, Workspace, estimate_vertical_slash
from megactx.attention.sparse.kernel import KeySource, sparse_attention
from megactx.attention.sparse.patterns import SparsePatterns
from megactx.attention.sparse.plan import MERGE_GAP, Plan, block_sparse_plan, plan_density, vertical_slash_plan
from megactx.attention.sparse import pooled
from megactx.attention.sparse.pooled import group_means, pooled_plan, pooled_scores
from megactx.attention.sparse.probe import SparseCall, SparseProbe
from megactx.config import SparseConfig

DCA_PART_COLUMNS = 8  # evenly spaced columns every DCA part keeps, so that no part is ever empty


@dataclass(frozen=True)
class OwnedKeys:
    """Context parallelism: this rank holds only some of the keys (its stripes), and its partial result is merged
    with the other ranks' by log-sum-exp. Every rank plans the same: the pooled estimate reads the keys only
    through their 64-key group means, and a group lies within one stripe, so the ranks share their groups' means
    and score them all. Each rank then computes the plan's keys it holds, and of the own blocks its own keys."""
    share_means: Callable[[torch.Tensor], torch.Tensor]  # [Hkv, G, D]: own groups' means (others unset) -> all
    clip: Callable  # bounds [R, 2], entry [R] -> the parts this rank holds (batched.clip_plan)
    own_blocks: Callable  # as kernel.own_blocks, over this rank's keys (-inf where a row sees none)


class SparsePrefill:
    """cfg: resolved settings (megactx.attention.sparse.patterns.resolve_sparse); patterns: each head's."""

    def __init__(self, cfg: SparseConfig, patterns: SparsePatterns, num_layers: int, num_heads: int, scale: float,
                 first_head: int = 0):
        """num_heads: the heads this process computes, from first_head (tensor parallelism: its share)."""
        self.cfg, self.scale = cfg, scale
        self.patterns = [patterns.layer_patterns(li, num_heads, first_head) for li in range(num_layers)]
        self.workspace = Workspace()  # the estimate's probabilities, reused across layers and chunks
        self.probe: SparseProbe | None = None
        # per layer: (sequence id, fp32 key sums of its first whole 64-key groups [Hkv, G, D]). A group's keys never
        # change once written, so each chunk of a long prompt sums only its own groups: without this, every chunk
        # re-read every key (0.27 s a layer and chunk at 1M keys, 2 cores), a cost that grew with the context.
        # One sequence per layer: 8 MB a layer at 1M keys of the 0.5B model.
        self.kept_sums: dict[int, tuple[int, torch.Tensor]] = {}

    def observe(self, probe: SparseProbe | None) -> None:
        """Record every call into `probe` from now on (None: stop)."""
        self.probe = probe

    def applies(self, prompt_len: int, num_new: int) -> bool:
        return prompt_len > self.cfg.threshold and num_new >= min(self.cfg.last_q, 2)

    def attend(self, layer: int, segments: list[tuple[int, int, torch.Tensor]],
               estimate_segments: list[tuple[int, int, torch.Tensor]], keys: KeySource, q_start: int,
               dca_parts: list[tuple[int, int]] = (), owned: OwnedKeys | None = None,
               seq_id: int = -1) -> tuple[torch.Tensor, torch.Tensor] | None:
        """segments: (lo, hi, q [n, H, D]) the rotated queries for each key range, as the attention uses them;
        estimate_segments: (lo, hi, q_last [r, H, D]) the rotations that score the last r queries (DCA: the
        critical positions). dca_parts: key ranges that must keep a few columns.
        -> out [n, H, D], lse [n, H]; or None when the plan computes more than cfg.max_density of the pairs, where
        the dense kernel is faster: the caller computes the rows densely. owned: this rank's part only (context
        parallelism; the fallback is decided on the whole plan, the same on every rank). seq_id: the sequence's
        id (-1: none), under which the pooled estimate keeps its group sums for the sequence's next chunk."""
        t0 = time.perf_counter()
        n = segments[0][2].shape[0]
        plan = self.plan(layer, segments, estimate_segments, keys, q_start, n, dca_parts, owned=owned,
                         seq_id=seq_id)
        density = plan_density(plan, q_start, n, self.cfg.block_size)
        t1 = time.perf_counter()
        fallback = density > self.cfg.max_density
        result = None
        if not fallback:
            # a pooled plan is many short ranges: computed in batched calls (batched.py); a vertical-slash plan's
            # wide slash bands are read as views and shared by tiles of blocks (kernel.py)
            kernel = batched_sparse_attention if self.cfg.estimate == "pooled" else sparse_attention
            if owned is None:
                result = kernel(segments, keys, plan, q_start, self.cfg.block_size, self.scale)
            else:
                result = kernel(segments, keys, clip_plan(plan, owned.clip), q_start, self.cfg.block_size,
                                self.scale, own=owned.own_blocks)
        if self.probe is not None:
            self.probe.calls.append(SparseCall(layer, q_start, n, density, fallback, t1 - t0,
                                               time.perf_counter() - t1,
                                               plan if self.probe.record_plans else None,
                                               self.cfg.block_size))
        return result

    def whole_group_sums(self, layer: int, seq_id: int, k: torch.Tensor, q_start: int, m: int) -> torch.Tensor:
        """k [Hkv, >= m, D] the sequence's keys -> group_sums of its m // GROUP whole groups, summing only those
        that the sums kept for this sequence lack. Kept sums are used only while they end at or before q_start:
        a sequence computed again from an earlier position (after preemption) starts over."""
        kept_id, kept = self.kept_sums.get(layer, (-1, None))
        if seq_id < 0 or kept_id != seq_id or kept.shape[1] * pooled.GROUP > q_start:
            kept = None  # another sequence, or this one computed again from an earlier position
        start = 0 if kept is None else kept.shape[1]
        new = pooled.group_sums(k, start, m // pooled.GROUP)
        sums = new if kept is None else torch.cat([kept, new], 1)
        if seq_id >= 0:
            self.kept_sums[layer] = (seq_id, sums)
        return sums

    def plan(self, layer: int, segments, estimate_segments, keys: KeySource, q_start: int, n: int,
             dca_parts, q_pos: torch.Tensor | None = None, owned: OwnedKeys | None = None,
             seq_id: int = -1) -> Plan:
        """q_pos: positions of the estimating queries (default: the last r, as MInference and the engine).
        owned: context parallelism, where only the pooled estimate and a-shape heads can plan (the engine checks)."""
        patterns = self.patterns[layer]
        h = len(patterns)
        m = q_start + n
        block = self.cfg.block_size
        verticals = torch.tensor([p.vertical_size for p in patterns])
        slashes = torch.tensor([p.slash_size for p in patterns])
        kinds = [p.kind for p in patterns]
        plans: list = [None] * h
        vs_heads = torch.tensor([i for i, kind in enumerate(kinds) if kind == "vertical_and_slash"], dtype=torch.long)
        pooled_heads = len(vs_heads) and self.cfg.estimate == "pooled"
        # [Hkv, m, D]: a view of a contiguous cache, a gather of a paged one: read once for both patterns; the
        # pooled estimate reads it only through the group means, summed from the cache's own dtype
        k_all = keys.keys(0, m, raw=pooled_heads and "block_sparse" not in kinds) \
            if len(vs_heads) or "block_sparse" in kinds else None
        if pooled_heads:
            # every head is scored (a config mixing kinds pays for the others too): [len(vs_heads), B, G]
            sums = self.whole_group_sums(layer, seq_id, k_all, q_start, m) if owned is None else None
            means, log_size = group_means(k_all, m, sums)
            if owned is not None:
                means = owned.share_means(means)
            if self.cfg.coarse_refine is not None:
                score = coarse_to_fine_scores(segments, k_all, q_start, block, self.scale, self.cfg.coarse_refine,
                                              means=(means, log_size))[vs_heads]
            else:
                score = pooled_scores(segments, k_all, q_start, block, self.scale,
                                      means=(means, log_size))[vs_heads]
            for head, plan in zip(vs_heads.tolist(), pooled_plan(score, q_start, n, block, self.cfg.pooled_cutoff,
                                                                   dca_parts, self.cfg.max_keys)):
                plans[head] = plan
        elif len(vs_heads):
            r = estimate_segments[0][2].shape[0]
            # only the vertical-slash heads are estimated: the others never read the estimate
            q_pos = torch.arange(m - r, m) if q_pos is None else q_pos
            vs = estimate_vertical_slash(estimate_segments, k_all, q_pos, self.scale,
                                         verticals[vs_heads], slashes[vs_heads], self.cfg.mass,
                                         heads=vs_heads if len(vs_heads) < h else None, workspace=self.workspace)
            vs = _with_part_columns(vs, dca_parts)
            # merge_gap: MERGE_GAP at the default 256-row blocks, scaled down with the tests' small blocks
            plans_vs = vertical_slash_plan(vs, q_start, n, block, merge_gap=min(MERGE_GAP, block))
            for head, plan in zip(vs_heads.tolist(), plans_vs):
                plans[head] = plan
        a_heads = [i for i, kind in enumerate(kinds) if kind == "a_shape"]
        if a_heads:
            sinks = [torch.arange(min(max(patterns[i].vertical_size, 1), m)) for i in a_heads]
            local = [torch.arange(min(max(patterns[i].slash_size, 1), m)) for i in a_heads]
            vs = _with_part_columns(VerticalSlash(_pad(sinks), _pad(local)), dca_parts)
            for head, plan in zip(a_heads, vertical_slash_plan(vs, q_start, n, block)):
                plans[head] = plan
        bs_heads = torch.tensor([i for i, kind in enumerate(kinds) if kind == "block_sparse"], dtype=torch.long)
        if len(bs_heads):
            lo, hi, q = segments[0]
            for head, plan in zip(bs_heads.tolist(), block_sparse_plan(q, k_all, q_start, block, verticals[bs_heads],
                                                                        heads=bs_heads)):
                plans[head] = plan
        return plans


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    # per-head index lists of different lengths -> [H, max] by repeating each row's last index
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])


def _with_part_columns(vs: VerticalSlash, parts: list[tuple[int, int]]) -> VerticalSlash:
    """A DCA part must not be empty (MInference under DCA, Qwen2.5-1M): every head keeps a few evenly spaced
    columns of it."""
    extra = [torch.linspace(lo, hi - 1, min(DCA_PART_COLUMNS, hi - lo)).round().long() for lo, hi in parts if hi > lo]
    if not extra:
        return vs
    cols = torch.cat(extra)[None].expand(vs.verticals.shape[0], -1).to(vs.verticals.device)
    return VerticalSlash(torch.cat([vs.verticals, cols], dim=1).sort(dim=1).values, vs.slashes)
