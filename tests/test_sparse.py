"""Sparse prefill: the kernel equals dense attention under the plan's mask (with the right LSE), plans agree with
their naive definition, full budgets give dense attention exactly (plain and inside DCA), partial budgets inside
DCA equal the naive DCA reference under the recorded plan's mask, and the config file's errors."""
import json

import pytest
import torch

from megactx.attention.backend import AttentionMetadata, KVCacheTensors, SeqAttention
from megactx.attention.dca import DCAConfig, DualChunkAttentionBackend, reference_dual_chunk_attention
from megactx.attention.dense import reference_attention
from megactx.errors import ConfigError
from megactx.layers.rotary import apply_rotary
from megactx.sparse.config import DEFAULT_HEAD, HeadPattern, SparseConfig, load_sparse_config, resolve_sparse
from megactx.sparse.estimate import VerticalSlash
from megactx.sparse.kernel import KeySource, shared_keys, sparse_attention, subtract_spans, tile_shared_spans
from megactx.sparse.plan import BlockKeys, block_sparse_plan, plan_mask, vertical_slash_plan
from megactx.sparse.prefill import SparsePrefill
from helpers import engine_logits, token_ids
from test_dca import D, H, HKV, _qkv, _rotary


def _masked_reference(q, k, v, mask, scale):
    # q: [n, H, D], k/v: [Hkv, m, D], mask [H, n, m] -> out [n, H, D], lse [n, H], head by head
    g = q.shape[1] // k.shape[0]
    outs, lses = zip(*[reference_attention(q[:, h:h + 1], k[h // g:h // g + 1], v[h // g:h // g + 1], scale, mask[h])
                       for h in range(q.shape[1])])
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _random_vs(m, n_vert, n_slash, seed=0):
    g = torch.Generator().manual_seed(seed)
    verticals = torch.stack([torch.randperm(m, generator=g)[:n_vert].sort().values for _ in range(H)])
    slashes = torch.stack([torch.randperm(m, generator=g)[:n_slash].sort().values for _ in range(H)])
    return VerticalSlash(verticals, slashes)


def _naive_vs_mask(vs, q_start, n, block, m):
    """The block-granular vertical-slash set, pair by pair: key j for the query at p (block start a) when j <= p
    and (j is a vertical, or j >= a, or a - d <= j < a - d + block for some slash d)."""
    mask = torch.zeros(H, n, m, dtype=torch.bool)
    for h in range(H):
        verts = set(vs.verticals[h].tolist())
        slashes = vs.slashes[h].tolist()
        for i in range(n):
            p = q_start + i
            a = q_start + (i // block) * block
            for j in range(p + 1):
                mask[h, i, j] = j in verts or j >= a or any(a - d <= j < a - d + block for d in slashes)
    return mask


@pytest.mark.parametrize("q_start,n,block", [(0, 90, 16), (37, 61, 16), (100, 50, 32)])
def test_vertical_slash_plan_is_its_naive_definition(q_start, n, block):
    m = q_start + n
    vs = _random_vs(m, 7, 5, seed=q_start)
    plan = vertical_slash_plan(vs, q_start, n, block, merge_gap=0)
    naive = _naive_vs_mask(vs, q_start, n, block, m)
    assert torch.equal(plan_mask(plan, q_start, n, block, m), naive)
    merged = plan_mask(vertical_slash_plan(vs, q_start, n, block, merge_gap=8), q_start, n, block, m)
    assert bool((merged >= naive).all()) and bool((merged <= torch.ones_like(naive).tril(q_start)).all())
    for h in range(H):  # spans and gathered columns never overlap, nothing at or after the block start
        for i, keys in enumerate(plan[h]):
            idx = keys.indices()
            assert len(idx) == len(set(idx.tolist())) and bool((idx < q_start + i * block).all())


@pytest.mark.parametrize("q_start", [0, 64])
def test_kernel_equals_masked_dense_attention_with_its_lse(q_start):
    n, block = 150, 32
    m = q_start + n
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    plan = vertical_slash_plan(_random_vs(m, 9, 6), q_start, n, block)
    out, lse = sparse_attention([(0, m, q)], KeySource(k, v, slice(0, m), torch.float32), plan, q_start, block,
                                D ** -0.5)
    ref_out, ref_lse = _masked_reference(q, k, v, plan_mask(plan, q_start, n, block, m), D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_keys_every_block_reads_are_computed_once_and_still_equal_the_masked_reference():
    n, block, q_start = 100, 16, 300
    m = q_start + n
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    sinks_and_far = torch.cat([torch.arange(4), torch.tensor([50, 51, 120, 290])])  # before the chunk: every block
    verticals = torch.stack([torch.cat([sinks_and_far, torch.tensor([310 + 20 * h, 330 + 20 * h])]) for h in range(H)])
    slashes = torch.tensor([[1, 2, 3]] * H)
    plan = vertical_slash_plan(VerticalSlash(verticals, slashes), q_start, n, block, merge_gap=0)
    plan[0] = [BlockKeys([(0, 8)] + b.ranges, b.columns[b.columns >= 8]) for b in plan[0]]  # a span every block has
    ranges, cols = shared_keys(plan[0])
    assert (0, 8) in ranges and {50, 51, 120, 290} <= set(cols.tolist())
    out, lse = sparse_attention([(0, m, q)], KeySource(k, v, slice(0, m), torch.float32), plan, q_start, block,
                                D ** -0.5)
    ref_out, ref_lse = _masked_reference(q, k, v, plan_mask(plan, q_start, n, block, m), D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_isolated_slashes_as_exact_diagonals_are_their_naive_definition():
    """diagonal_cost > 0: a slash alone in its run is one key per row (p - d), a band stays block-granular."""
    n, block, q_start = 96, 16, 160
    m = q_start + n
    band = torch.arange(1, 9)  # 8 slashes in 23 keys' width: 8 * 4 > 23, stays a span
    isolated = torch.tensor([40, 90, 130, 200])  # apart by more than a block: each alone in its run
    verticals = torch.tensor([0, 3, 70, 100, 150, 170])
    vs = VerticalSlash(verticals[None].expand(H, -1), torch.cat([band, isolated])[None].expand(H, -1))
    plan = vertical_slash_plan(vs, q_start, n, block, merge_gap=0, diagonal_cost=4)
    assert plan[0][0].diagonals.tolist() == isolated.tolist()
    mask = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        p = q_start + i
        a = q_start + (i // block) * block
        for j in range(p + 1):
            mask[i, j] = (j in verticals.tolist() or j >= a or any(a - d <= j < a - d + block for d in band.tolist())
                          or (j < a and p - j in isolated.tolist()))
    assert torch.equal(plan_mask(plan, q_start, n, block, m), mask[None].expand(H, -1, -1))
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    out, lse = sparse_attention([(0, m, q)], KeySource(k, v, slice(0, m), torch.float32), plan, q_start, block,
                                D ** -0.5)
    ref_out, ref_lse = _masked_reference(q, k, v, mask[None].expand(H, -1, -1), D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def _span_keys(spans):
    return {j for lo, hi in spans for j in range(lo, hi)}


def test_span_set_operations_agree_with_sets():
    g = torch.Generator().manual_seed(9)
    for _ in range(50):
        a, b = (subtract_spans([(0, 200)], [(x, x + int(w)) for x, w in zip(
            torch.randperm(200, generator=g)[:6].sort().values.tolist(), torch.randint(1, 30, (6,), generator=g))])
            for _ in range(2))
        assert _span_keys(subtract_spans(a, b)) == _span_keys(a) - _span_keys(b)
        shared = tile_shared_spans([a, b], min_width=1)
        assert _span_keys(shared) == _span_keys(a) & _span_keys(b)
        assert all(hi - lo >= 5 for lo, hi in tile_shared_spans([a, b], min_width=5))


@pytest.mark.parametrize("segments", [1, 3])
def test_keys_a_tile_of_blocks_shares_are_computed_once_and_still_equal_the_masked_reference(segments):
    """Wide slash bands: consecutive blocks read overlapping shifted spans; the tile computes the overlap for all
    its rows at once, and narrow spans are gathered with the columns. Same result block by block, with every
    span a view or every span gathered, and as the reference under the plan's mask (also with DCA-like
    segments: different queries for different key ranges)."""
    n, block, q_start = 200, 16, 400
    m = q_start + n
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    slashes = torch.stack([torch.cat([torch.arange(1, 9), torch.arange(100 + 10 * h, 190 + 10 * h)]) for h in range(H)])
    verticals = torch.stack([torch.tensor([0, 1, 350 + h, 450 + h, 500 + h]) for h in range(H)])
    plan = vertical_slash_plan(VerticalSlash(verticals, slashes), q_start, n, block)
    assert tile_shared_spans([b.ranges for b in plan[0][:4]], 2 * block)  # the tiles really share spans
    cuts = [0, 300, 480, m] if segments == 3 else [0, m]
    segs = [(lo, hi, q if i == 0 else torch.randn(n, H, D, generator=g)) for i, (lo, hi) in
            enumerate(zip(cuts, cuts[1:]))]
    keys = KeySource(k, v, slice(0, m), torch.float32)
    out, lse = sparse_attention(segs, keys, plan, q_start, block, D ** -0.5)
    for other in ({"tile_blocks": 1}, {"min_view": 0}, {"min_view": 1000}):  # no tiles; no gathering; all gathered
        other_out, other_lse = sparse_attention(segs, keys, plan, q_start, block, D ** -0.5, **other)
        torch.testing.assert_close(out, other_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, other_lse, atol=2e-5, rtol=1e-4)
    if segments == 1:
        ref_out, ref_lse = _masked_reference(q, k, v, plan_mask(plan, q_start, n, block, m), D ** -0.5)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_kernel_reads_paged_slots_and_half_precision_cache():
    n, block, m = 70, 16, 70
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    perm = torch.randperm(m, generator=g)  # position p lives in slot perm[p] of a bf16 cache
    ck, cv = torch.zeros(HKV, m, D, dtype=torch.bfloat16), torch.zeros(HKV, m, D, dtype=torch.bfloat16)
    ck[:, perm], cv[:, perm] = k.bfloat16(), v.bfloat16()
    plan = vertical_slash_plan(_random_vs(m, 5, 4), 0, n, block)
    out, _ = sparse_attention([(0, m, q)], KeySource(ck, cv, perm, torch.float32), plan, 0, block, D ** -0.5)
    ref, _ = _masked_reference(q, k.bfloat16().float(), v.bfloat16().float(), plan_mask(plan, 0, n, block, m), D ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_block_sparse_plan_keeps_the_top_pooled_blocks():
    n, block, q_start, kb = 80, 32, 256, 16  # the last query block is partial
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(n, H, D, generator=g), torch.randn(HKV, q_start + n, D, generator=g)
    plan = block_sparse_plan(q, k, q_start, block, torch.tensor([3, 1, 5, 16]), key_block=kb)
    for h in range(H):
        for i, keys in enumerate(plan[h]):
            a = q_start + i * block
            rows = q[i * block:(i + 1) * block, h].mean(0)
            pooled = k[h // 2, :q_start].reshape(-1, kb, D).mean(1) @ rows  # blocks before the chunk
            pooled[0] = float("inf")
            want = {int(x) for x in torch.topk(pooled, [3, 1, 5, 16][h]).indices}
            want |= set(range(q_start // kb, a // kb))  # the chunk's own keys before the block: local
            got = {int(x) // kb for x in keys.indices()}
            assert got == want


def test_block_sparse_plan_of_a_subset_of_heads_equals_those_rows_of_the_full_plan():
    n, block, q_start, kb = 80, 32, 320, 16  # the last query block is partial
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(n, H, D, generator=g), torch.randn(HKV, q_start + n, D, generator=g)
    tops = torch.tensor([3, 1, 5, 16])
    full = block_sparse_plan(q, k, q_start, block, tops, key_block=kb)
    heads = torch.tensor([1, 3])
    part = block_sparse_plan(q, k, q_start, block, tops[heads], key_block=kb, heads=heads)
    assert len(part) == 2
    for j, h in enumerate(heads.tolist()):
        assert [b.ranges for b in part[j]] == [b.ranges for b in full[h]]


def _run_sparse_dca(q, k, v, dca, splits, budgets, block=16, max_density=1.0, stats=None, span=8192,
                    exact_diagonals=False):
    """The DCA backend with sparse prefill on, fed in chunks; returns outputs and the recorded plans.
    max_density 1.0: the sparse kernel computes every chunk (no dense fallback) unless the test says otherwise."""
    t = q.shape[0]
    rotary = _rotary()
    backend = DualChunkAttentionBackend(H, HKV, D, dca, rotary)
    backend.cache = KVCacheTensors(1, HKV, D, t, torch.float32, torch.device("cpu"))
    cfg = SparseConfig(threshold=0, last_q=8, block_size=block, max_density=max_density, estimate_span=span,
                       exact_diagonals=exact_diagonals, layers=[{h: HeadPattern("vertical_and_slash", *budgets) for h in range(H)}])
    backend.sparse = SparsePrefill(cfg, 1, H, backend.scale)
    backend.sparse.plans = []
    outs, c = [], 0
    for n in splits:
        pos = torch.arange(c, c + n)
        backend.meta = AttentionMetadata([SeqAttention(0, n, c, slice(0, c + n), sparse=True)], slice(c, c + n))
        backend.prepare_step(pos, torch.full((n,), c + n))
        k_rot = apply_rotary(k[c:c + n], *rotary.cos_sin(backend.key_positions(pos)))
        outs.append(backend(0, q[c:c + n], k_rot, v[c:c + n]))
        c += n
    if stats is not None:
        stats.append(backend.sparse.stats)
    return torch.cat(outs), backend.sparse.plans, rotary


@pytest.mark.parametrize("splits", [[150], [61, 89], [33, 50, 67]])
def test_full_budgets_inside_dca_equal_dense_dca(splits):
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    q, k, v = _qkv(150)
    out, _, rotary = _run_sparse_dca(q, k, v, dca, splits, (1000, 1000))
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_partial_budgets_inside_dca_equal_the_reference_under_the_plan():
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    t = 150
    q, k, v = _qkv(t, seed=4)
    out, plans, rotary = _run_sparse_dca(q, k, v, dca, [70, 80], (31, 50), block=16)
    mask = torch.zeros(H, t, t, dtype=torch.bool)
    for _, q_start, plan in plans:  # one plan per DCA piece; rows [q_start, q_start + n)
        n = len(plan[0]) * 16
        piece = plan_mask(plan, q_start, min(n, t - q_start), 16, t)
        rows = slice(q_start, q_start + piece.shape[1])
        mask[:, rows] = piece
    assert not bool(mask.all(-1).all())  # really sparse
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5, mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_exact_diagonals_inside_dca_equal_the_reference_under_the_plan():
    """The diagonal part scores each key with the rotation of the DCA part that key falls in."""
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    t = 400
    q, k, v = _qkv(t, seed=7)
    out, plans, rotary = _run_sparse_dca(q, k, v, dca, [170, 230], (6, 130), block=16, exact_diagonals=True)
    assert any(len(b.diagonals) for _, _, plan in plans for head in plan for b in head)
    mask = torch.zeros(H, t, t, dtype=torch.bool)
    for _, q_start, plan in plans:
        piece = plan_mask(plan, q_start, min(len(plan[0]) * 16, t - q_start), 16, t)
        mask[:, q_start:q_start + piece.shape[1]] = piece
    assert not bool(mask[:, torch.ones(t, t, dtype=torch.bool).tril()].all())  # really sparse
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5, mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def _plan_ranges(plans):
    return [(layer, q_start, [[(b.ranges, b.columns.tolist()) for b in head] for head in plan])
            for layer, q_start, plan in plans]


def test_estimate_parts_split_a_chunk_evenly_within_the_span():
    cfg = SparseConfig(estimate_span=8192)
    assert cfg.parts(0, 16384) == [(0, 8192), (8192, 16384)]
    assert cfg.parts(100, 8292) == [(100, 8292)]
    parts = cfg.parts(5, 20005)
    assert len(parts) == 3 and parts[0][0] == 5 and parts[-1][1] == 20005
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and all(hi - lo <= 8192 for lo, hi in parts)
    assert SparseConfig(estimate_span=0).parts(0, 100000) == [(0, 100000)]
    assert "an estimate every 8192 rows" in cfg.describe()
    with pytest.raises(ConfigError, match="--sparse-estimate-span"):
        SparseConfig(estimate_span=-1)


def test_a_chunk_planned_in_parts_equals_chunks_of_the_part_size_inside_dca():
    # DCA pieces of 32 rows (chunk_len 40 - 8), each planned in two parts of 16 rows from their own last queries:
    # the same plans and output as 16-row prefill chunks with one estimate each
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    q, k, v = _qkv(128, seed=5)
    out_parts, plans_parts, _ = _run_sparse_dca(q, k, v, dca, [128], (31, 50), span=16)
    out_chunks, plans_chunks, _ = _run_sparse_dca(q, k, v, dca, [16] * 8, (31, 50), span=0)
    assert [q_start for _, q_start, _ in plans_parts] == list(range(0, 128, 16))
    assert _plan_ranges(plans_parts) == _plan_ranges(plans_chunks)
    torch.testing.assert_close(out_parts, out_chunks, atol=1e-6, rtol=1e-6)
    _, plans_whole, _ = _run_sparse_dca(q, k, v, dca, [128], (31, 50), span=0)
    assert [q_start for _, q_start, _ in plans_whole] == [0, 32, 64, 96]  # one estimate per DCA piece


def test_dense_fallback_above_max_density_inside_dca():
    # full budgets plan every key: above max_density each chunk is computed by the dense DCA path instead,
    # which equals the reference exactly; partial budgets planned below it still run the kernel
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    q, k, v = _qkv(150)
    stats = []
    out, _, rotary = _run_sparse_dca(q, k, v, dca, [61, 89], (1000, 1000), max_density=0.6, stats=stats)
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    pieces = len(stats[0].planned[0])
    assert stats[0].fallbacks[0] == pieces and all(p > 0.6 for p in stats[0].planned[0])
    assert stats[0].density[0] == [1.0] * pieces  # what was computed
    _run_sparse_dca(q, k, v, dca, [61, 89], (31, 50), max_density=0.99, stats=stats)
    sparse_pieces = sum(p <= 0.99 for p in stats[1].planned[0])
    assert sparse_pieces > 0 and stats[1].fallbacks.get(0, 0) == len(stats[1].planned[0]) - sparse_pieces


def test_engine_full_budgets_equal_dense_for_every_pattern(tiny_dir, tmp_path):
    from megactx.engine.llm_engine import LLMEngine
    from megactx.config import EngineConfig, SchedulerConfig
    path = tiny_dir("qwen2")
    cfg_file = tmp_path / "sparse.json"
    heads = {"0": ["vertical_and_slash", 4096, 4096, 0.9], "1": ["a_shape", 4096, 4096, 0.9],
             "2": ["block_sparse", 4096, 0, 0.9], "3": ["stream_llm", 4096, 4096, 0.9]}
    cfg_file.write_text(json.dumps([heads, heads]))
    ids = token_ids(300)

    def logits(**kw):
        e = LLMEngine(EngineConfig(model=path, scheduler=SchedulerConfig(max_num_batched_tokens=120), **kw))
        return engine_logits(e, ids), e

    dense, _ = logits(sparse=False)
    sparse, engine = logits(sparse_threshold=0, sparse_config=str(cfg_file), sparse_block_size=32,
                            sparse_max_density=1.0)
    stats = engine.runner.backend.sparse.stats
    assert stats.attention_s and not stats.fallbacks  # the sparse kernel ran on every chunk
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    fallback, engine = logits(sparse_threshold=0, sparse_config=str(cfg_file), sparse_block_size=32)
    stats = engine.runner.backend.sparse.stats
    assert sum(stats.fallbacks.values()) == sum(len(d) for d in stats.planned.values())  # dense plans: dense path
    torch.testing.assert_close(fallback, dense, atol=1e-4, rtol=1e-4)
    _, below = logits(sparse_threshold=300, sparse_config=str(cfg_file), sparse_block_size=32)
    assert not below.runner.backend.sparse.stats.attention_s  # a prompt of 300 tokens is not above 300: dense


def test_engine_chunk_planned_in_parts_equals_smaller_chunks(tiny_dir, tmp_path):
    # the dense (non-DCA) backend: a 120-row chunk planned in three 40-row parts is 40-row chunks, plan for plan
    from megactx.engine.llm_engine import LLMEngine
    from megactx.config import EngineConfig, SchedulerConfig
    cfg_file = tmp_path / "sparse.json"
    cfg_file.write_text(json.dumps([{str(h): ["vertical_and_slash", 40, 60, 0.9] for h in range(4)}] * 2))
    ids = token_ids(240, seed=3)

    def run(chunk, span):
        e = LLMEngine(EngineConfig(model=tiny_dir("qwen2"), scheduler=SchedulerConfig(max_num_batched_tokens=chunk),
                                   sparse_threshold=0, sparse_config=str(cfg_file), sparse_block_size=16,
                                   sparse_last_q=8, sparse_max_density=1.0, sparse_estimate_span=span))
        e.runner.backend.sparse.plans = []
        logits = engine_logits(e, ids)
        return logits, sorted(_plan_ranges(e.runner.backend.sparse.plans), key=lambda p: p[:2]), e

    in_parts, plans_parts, engine = run(120, 40)
    in_chunks, plans_chunks, _ = run(40, 0)
    assert [q_start for layer, q_start, _ in plans_parts if layer == 0] == list(range(0, 240, 40))
    densities = [d for ds in engine.runner.backend.sparse.stats.planned.values() for d in ds]
    assert min(densities) < 0.9  # really sparse: the last parts skip keys
    assert plans_parts == plans_chunks
    torch.testing.assert_close(in_parts, in_chunks, atol=1e-5, rtol=1e-5)
    _, plans_whole, _ = run(120, 0)
    assert plans_whole != plans_parts  # the span changed what was computed


def test_config_file_parsing_and_errors(tmp_path):
    good = tmp_path / "sparse_attention_config.json"
    good.write_text(json.dumps([{"0": ["vertical_and_slash", 100, 800, 0.95], "3": ["stream_llm", 64, 512, 0.9]}]))
    cfg = load_sparse_config(good)
    assert cfg.head(0, 0) == HeadPattern("vertical_and_slash", 100, 800)
    assert cfg.head(0, 3) == HeadPattern("a_shape", 64, 512)
    assert cfg.head(0, 1) == DEFAULT_HEAD == HeadPattern("vertical_and_slash", 1000, 6096)
    assert cfg.head(5, 0) == DEFAULT_HEAD
    (tmp_path / "model.gguf").write_bytes(b"")
    assert resolve_sparse(tmp_path / "model.gguf").source == str(good)  # found beside the model
    assert resolve_sparse(tmp_path / "model.gguf", enabled=False) is None
    cases = {
        "{": "not valid JSON",
        '{"0": 1}': "expected a list over layers",
        '[{"0": ["diagonal", 1, 2, 0]}]': "unknown pattern 'diagonal'",
        '[{"0": ["a_shape", "x", 2, 0]}]': "budgets must be integers",
        '[{"h": ["a_shape", 1, 2, 0]}]': "is not a head index",
        '[{"0": ["a_shape", 1]}]': "expected [pattern, vertical_size, slash_size, score]",
        '[{"0": ["a_shape", -1, 2, 0]}]': "budgets must be >= 0",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_sparse_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_sparse_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="sparse-last-q"):
        SparseConfig(last_q=0)


def test_mass_setting_is_checked():
    from megactx.errors import ConfigError
    from megactx.sparse.config import SparseConfig
    assert "mass cut-off 0.95" in SparseConfig(mass=0.95).describe()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="--sparse-mass"):
            SparseConfig(mass=bad)
        with pytest.raises(ConfigError, match="--sparse-max-density"):
            SparseConfig(max_density=bad)
