"""The batched sparse kernel (batched.py) against the dense masked reference and the per-block kernel: pooled and
vertical-slash plans, padded and unpadded batches, several batches, DCA-like segments, a short last block, a
paged half-precision cache, and the fall-back for what it does not do."""
import pytest
import torch

from megactx.attention.sparse import batched
from megactx.attention.sparse.batched import _batches, batched_sparse_attention, plan_bounds, split_tiles, supports
from megactx.attention.sparse.kernel import KeySource, sparse_attention
from megactx.attention.sparse.plan import BlockKeys, plan_mask, vertical_slash_plan
from megactx.attention.sparse.pooled import pooled_plan, pooled_scores
from test_dca import D, H, HKV
from test_sparse_kernel import _masked_reference, _random_vs, check_paged_half_precision


def _qkv(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)


def _pooled(q, k, q_start, block, cutoff):
    return pooled_plan(pooled_scores([(0, k.shape[1], q)], k, q_start, block, D ** -0.5), q_start, q.shape[0], block,
                       cutoff)


@pytest.mark.parametrize("q_start,n,block,batch_keys", [(0, 96, 16, 1 << 18), (200, 100, 16, 1 << 18),
                                                        (512, 128, 32, 64), (300, 75, 16, 1)])
@pytest.mark.parametrize("group_pad,tile", [(1, 4), (64, 4), (64, 1), (64, 2)])
def test_batched_equals_the_masked_reference(monkeypatch, q_start, n, block, batch_keys, group_pad, tile):
    """Pooled plans (ranges of whole groups) and vertical-slash plans (ranges and single columns), in one batch,
    in many (batch_keys 64 and 1: a call per entry), padded to 64 keys under a mask or not padded at all, with
    the keys shared by tiles of blocks computed apart or not (tile 1)."""
    monkeypatch.setattr(batched, "GROUP_PAD", group_pad)
    m = q_start + n
    q, k, v = _qkv(n, m, seed=n)
    keys = KeySource(k, v, slice(0, m), torch.float32)
    for plan in (_pooled(q, k, q_start, block, 0.6), vertical_slash_plan(_random_vs(m, 9, 6), q_start, n, block)):
        out, lse = batched_sparse_attention([(0, m, q)], keys, plan, q_start, block, D ** -0.5, batch_keys=batch_keys,
                                            tile=tile)
        ref_out, ref_lse = _masked_reference(q, k, v, plan_mask(plan, q_start, n, block, m), D ** -0.5)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_batched_with_dca_segments_equals_the_per_block_kernel():
    """Different queries for different key ranges (DCA's parts): each segment's keys are scored with its own
    queries, a range crossing a segment boundary is split there, as in the per-block kernel."""
    n, block, q_start = 100, 16, 400
    m = q_start + n
    q, k, v = _qkv(n, m, seed=3)
    g = torch.Generator().manual_seed(4)
    cuts = [0, 250, 430, m]
    segs = [(lo, hi, q if i == 0 else torch.randn(n, H, D, generator=g)) for i, (lo, hi) in
            enumerate(zip(cuts, cuts[1:]))]
    keys = KeySource(k, v, slice(0, m), torch.float32)
    for plan in (_pooled(q, k, q_start, block, 0.5), vertical_slash_plan(_random_vs(m, 12, 5), q_start, n, block)):
        out, lse = batched_sparse_attention(segs, keys, plan, q_start, block, D ** -0.5, batch_keys=256)
        ref_out, ref_lse = sparse_attention(segs, keys, plan, q_start, block, D ** -0.5)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_batched_reads_paged_slots_and_half_precision_cache():
    check_paged_half_precision(batched_sparse_attention, lambda q, k, n, block, m: _pooled(q, k, 0, block, 0.5))


def test_plans_it_cannot_batch_go_to_the_per_block_kernel():
    n, block, q_start = 64, 16, 160
    m = q_start + n
    q, k, v = _qkv(n, m, seed=5)
    plan = vertical_slash_plan(_random_vs(m, 4, 3), q_start, n, block)
    assert supports(KeySource(k, v, slice(0, m), torch.float32), q.device)
    keys = KeySource(k.transpose(0, 1).contiguous().transpose(0, 1), v, slice(0, m), torch.float32)  # strided
    assert not supports(keys, q.device)
    out, lse = batched_sparse_attention([(0, m, q)], keys, plan, q_start, block, D ** -0.5)
    ref_out, ref_lse = sparse_attention([(0, m, q)], keys, plan, q_start, block, D ** -0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_entries_batch_by_padded_width_within_the_budget():
    plan = [[BlockKeys([(0, 10), (20, 30)], torch.tensor([40, 45])), BlockKeys([], torch.empty(0, dtype=torch.long))],
            [BlockKeys([(5, 25)], torch.tensor([33])), BlockKeys([(0, 64)], torch.empty(0, dtype=torch.long))]]
    bounds, entry = plan_bounds(plan)
    assert bounds.tolist() == [[0, 10], [20, 30], [40, 41], [45, 46], [5, 25], [33, 34], [0, 64]]
    assert entry.tolist() == [0, 0, 0, 0, 2, 2, 3]
    width = torch.tensor([64, 0, 64, 64, 128])
    got = [b.tolist() for b in _batches(torch.tensor([0, 2, 3, 4]), width, budget=128)]
    assert got == [[0, 2], [3], [4]]  # equal widths together, at most budget // width per call


def _key_sets(bounds, entry, num):
    sets = [set() for _ in range(num)]
    for (lo, hi), e in zip(bounds.tolist(), entry.tolist()):
        assert not sets[e] & set(range(lo, hi))  # spans of an entry never overlap
        sets[e] |= set(range(lo, hi))
    return sets


@pytest.mark.parametrize("nb,tile", [(8, 4), (9, 4), (6, 2), (3, 4)])
def test_tiles_share_the_keys_all_their_blocks_read(nb, tile):
    """split_tiles() against sets: a full tile's shared keys are the intersection of its blocks' keys, each
    block keeps the rest of its own, the blocks after the last full tile keep all of theirs."""
    h = 2
    plan = vertical_slash_plan(_random_vs(400, 9, 4, seed=nb), 400 - nb * 16, nb * 16, 16)[:h]
    plan += _pooled(*_qkv(nb * 16, 400, seed=nb)[:2], 400 - nb * 16, 16, 0.6)[:1]
    h = len(plan)
    bounds, entry = plan_bounds(plan)
    shared, shared_entry, rest, rest_entry = split_tiles(bounds, entry, h, nb, tile)
    blocks = _key_sets(bounds, entry, h * nb)
    nt = nb // tile
    tiles, rests = _key_sets(shared, shared_entry, h * nt), _key_sets(rest, rest_entry, h * nb)
    assert any(tiles) or nt == 0
    for head in range(h):
        for b in range(nb):
            keys = blocks[head * nb + b]
            if b < nt * tile:
                common = set.intersection(*blocks[head * nb + b // tile * tile:head * nb + (b // tile + 1) * tile])
                assert tiles[head * nt + b // tile] == common
                assert rests[head * nb + b] == keys - common
            else:
                assert rests[head * nb + b] == keys
