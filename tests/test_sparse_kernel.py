"""Sparse prefill plans and kernel: the kernel equals dense attention under the plan's mask (with the right LSE)
in every way of calling flash (tiles, gathered spans, views), plans agree with their naive definition."""
import pytest
import torch

from megactx.attention.dense import reference_attention
from megactx.attention.sparse.estimate import VerticalSlash
from megactx.attention.sparse.kernel import (KeySource, shared_keys, span_positions, sparse_attention, subtract_spans,
                                   tile_shared_spans)
from megactx.attention.sparse.plan import (BlockKeys, block_sparse_plan, plan_mask, reference_vertical_slash_plan,
                                 vertical_slash_plan)
from test_dca import D, H, HKV

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


def _assert_kernel_equals_masked_reference(q, k, v, plan, q_start, block):
    n, m = q.shape[0], k.shape[1]
    out, lse = sparse_attention([(0, m, q)], KeySource(k, v, slice(0, m), torch.float32), plan, q_start, block,
                                D ** -0.5)
    ref_out, ref_lse = _masked_reference(q, k, v, plan_mask(plan, q_start, n, block, m), D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


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


@pytest.mark.parametrize("merge_gap", [0, 8, 40])
def test_vertical_slash_plan_equals_its_reference_block_by_block(merge_gap):
    """The fast plan (runs joined on their ends, columns and spans for all blocks at once) is the reference's:
    the same spans in the same order, the same columns, for every head and block; with bands,
    isolated slashes, padding by repetition, and a head whose slashes reach no earlier key."""
    g = torch.Generator().manual_seed(merge_gap)
    for q_start, n, block in [(0, 90, 16), (37, 61, 16), (300, 130, 32), (1000, 256, 64)]:
        m = q_start + n
        vs = _random_vs(m, 9, 12, seed=q_start + merge_gap)
        band = torch.arange(1, 13) + int(torch.randint(0, max(m - 13, 1), (1,), generator=g))
        slashes = torch.cat([vs.slashes[:, :6], band.clamp(max=m - 1)[None].expand(H, -1)[:, :6]], 1)
        slashes[1] = 0  # only the diagonal itself: no earlier key
        slashes[2, 6:] = slashes[2, 5]  # padding repeats an index
        vs = VerticalSlash(vs.verticals, slashes.sort(dim=1).values)
        fast = vertical_slash_plan(vs, q_start, n, block, merge_gap=merge_gap)
        ref = reference_vertical_slash_plan(vs, q_start, n, block, merge_gap=merge_gap)
        for head in range(H):
            for f, r in zip(fast[head], ref[head], strict=True):
                assert f.ranges == r.ranges
                assert torch.equal(f.columns, r.columns)


@pytest.mark.parametrize("q_start", [0, 64])
def test_kernel_equals_masked_dense_attention_with_its_lse(q_start):
    n, block = 150, 32
    m = q_start + n
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    plan = vertical_slash_plan(_random_vs(m, 9, 6), q_start, n, block)
    _assert_kernel_equals_masked_reference(q, k, v, plan, q_start, block)


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
    _assert_kernel_equals_masked_reference(q, k, v, plan, q_start, block)


def _span_keys(spans):
    return {j for lo, hi in spans for j in range(lo, hi)}


def test_span_positions_are_the_spans_keys_in_order():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        cuts = torch.randperm(200, generator=g)[:int(torch.randint(0, 12, (1,), generator=g))].sort().values.tolist()
        spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        want = [j for lo, hi in spans for j in range(lo, hi)]
        assert span_positions(spans).tolist() == want


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


def check_paged_half_precision(kernel, make_plan):
    """kernel(segments, keys, plan, q_start, block, scale) on a bf16 cache whose slots are shuffled, against the
    masked reference: fp32 compute within fp32 rounding, bf16 compute within bf16's, the LSE in fp32 both times.
    make_plan(q, k, n, block, m) -> the plan (from the unrounded keys)."""
    n, block, m = 70, 16, 70
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    perm = torch.randperm(m, generator=g)  # position p lives in slot perm[p] of a bf16 cache
    ck, cv = torch.zeros(HKV, m, D, dtype=torch.bfloat16), torch.zeros(HKV, m, D, dtype=torch.bfloat16)
    ck[:, perm], cv[:, perm] = k.bfloat16(), v.bfloat16()
    plan = make_plan(q, k, n, block, m)
    mask = plan_mask(plan, 0, n, block, m)
    out, lse = kernel([(0, m, q)], KeySource(ck, cv, perm, torch.float32), plan, 0, block, D ** -0.5)
    ref, ref_lse = _masked_reference(q, k.bfloat16().float(), v.bfloat16().float(), mask, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    qb = q.bfloat16()
    out, lse = kernel([(0, m, qb)], KeySource(ck, cv, perm, torch.bfloat16), plan, 0, block, D ** -0.5)
    ref, ref_lse = _masked_reference(qb.float(), k.bfloat16().float(), v.bfloat16().float(), mask, D ** -0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_kernel_reads_paged_slots_and_half_precision_cache():
    check_paged_half_precision(sparse_attention,
                               lambda q, k, n, block, m: vertical_slash_plan(_random_vs(m, 5, 4), 0, n, block))


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
