"""Vertical-slash estimation agrees with a naive, loop-by-loop computation; the mask is what it says."""
import torch

import pytest

from megactx.attention.sparse.estimate import (LOCAL_DIAGONALS, SINK_KEYS, VerticalSlash, estimate_vertical_slash,
                                               vertical_slash_mask)
from megactx.attention.sparse.plan import vertical_slash_plan


def _naive_scores(q, k, q_pos, scale):
    r, h, d = q.shape
    hkv, m, _ = k.shape
    vert = torch.zeros(h, m, dtype=torch.float64)
    slash = torch.zeros(h, m, dtype=torch.float64)
    for head in range(h):
        kh = k[head // (h // hkv)].double()
        for i in range(r):
            p = int(q_pos[i])
            s = (kh[: p + 1] @ q[i, head].double()) * scale
            a = torch.softmax(s, 0)
            for j in range(p + 1):
                vert[head, j] += a[j]
                slash[head, p - j] += a[j]
    return vert, slash


def test_estimation_matches_naive_scores_and_keeps_sinks_and_local_diagonals():
    g = torch.Generator().manual_seed(0)
    h, hkv, d, m, r = 4, 2, 8, 400, 16
    q = torch.randn(r, h, d, generator=g)
    k = torch.randn(hkv, m, d, generator=g)
    q_pos = torch.arange(m - r, m)
    budgets_v, budgets_s = torch.tensor([40, 60, 31, 45]), torch.tensor([120, 130, 150, 101])
    vs = estimate_vertical_slash(q, k, q_pos, d ** -0.5, budgets_v, budgets_s)
    vert, slash = _naive_scores(q, k, q_pos, d ** -0.5)
    for head in range(h):
        chosen_v = set(vs.verticals[head].tolist())
        assert len(chosen_v) == budgets_v[head] and set(range(SINK_KEYS)) <= chosen_v
        rest = vert[head].clone()
        rest[:SINK_KEYS] = float("inf")
        assert chosen_v == set(torch.topk(rest, int(budgets_v[head])).indices.tolist())
        chosen_s = set(vs.slashes[head].tolist())
        assert len(chosen_s) == budgets_s[head] and set(range(LOCAL_DIAGONALS)) <= chosen_s
        rest = slash[head].clone()
        rest[:LOCAL_DIAGONALS] = float("inf")
        assert chosen_s == set(torch.topk(rest, int(budgets_s[head])).indices.tolist())


def test_mask_is_verticals_and_slashes_under_causality():
    vs = VerticalSlash(torch.tensor([[0, 5]]), torch.tensor([[0, 2]]))
    mask = vertical_slash_mask(vs, torch.tensor([3, 7]), 10)[0]
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 3]  # query at 3: verticals 0 (5 is in its future), diagonals 3, 1
    assert mask[1].nonzero().flatten().tolist() == [0, 5, 7]  # query at 7: 0, 5 and diagonals 7, 5


def test_mass_cut_off_keeps_the_fewest_best_indices_reaching_the_share():
    g = torch.Generator().manual_seed(1)
    h, hkv, d, m, r = 4, 2, 8, 600, 16
    q = torch.randn(r, h, d, generator=g) * 6  # peaked attention: a few keys hold most of the mass
    k = torch.randn(hkv, m, d, generator=g)
    q_pos = torch.arange(m - r, m)
    budget_v, budget_s = 300, 400
    full = estimate_vertical_slash(q, k, q_pos, d ** -0.5, budget_v, budget_s)
    same = estimate_vertical_slash(q, k, q_pos, d ** -0.5, budget_v, budget_s, mass=1.0)
    assert torch.equal(full.verticals, same.verticals) and torch.equal(full.slashes, same.slashes)
    cut = estimate_vertical_slash(q, k, q_pos, d ** -0.5, budget_v, budget_s, mass=0.9)
    vert, slash = _naive_scores(q, k, q_pos, d ** -0.5)
    for head in range(h):
        for chosen, budgeted, raw, forced in ((cut.verticals, full.verticals, vert, SINK_KEYS),
                                             (cut.slashes, full.slashes, slash, LOCAL_DIAGONALS)):
            kept = set(chosen[head].tolist())
            assert kept <= set(budgeted[head].tolist()) and set(range(forced)) <= kept
            covered = float(raw[head, sorted(kept)].sum())
            whole_budget = float(raw[head, sorted(set(budgeted[head].tolist()))].sum())
            assert covered >= min(0.9 * float(raw[head].sum()), whole_budget) - 1e-6  # the share, or the budget
            # the fewest: without its weakest unforced index the head would fall short of the share
            weakest = min((j for j in kept if j >= forced), key=lambda j: float(raw[head, j]), default=None)
            if weakest is not None:
                assert covered - float(raw[head, weakest]) < 0.9 * float(raw[head].sum()) + 1e-6
        assert len(set(cut.verticals[head].tolist())) < budget_v  # the share is reached well within the budget


def test_scores_per_key_segment_and_queries_before_the_last_key():
    # DCA scores each key segment with its own query rotation; the queries need not be the last positions,
    # nor consecutive
    from megactx.attention.sparse.estimate import attention_probs, slash_scores
    g = torch.Generator().manual_seed(2)
    h, hkv, d, m, r = 4, 2, 8, 90, 12
    qs = [torch.randn(r, h, d, generator=g) for _ in range(3)]
    k = torch.randn(hkv, m, d, generator=g)
    segments = [(0, 20, qs[0]), (20, 55, qs[1]), (55, m, qs[2])]
    # queries at [first, first + r): keys after them exist, or few keys before them; or spread in runs
    spread = torch.tensor([3, 10, 11, 30, 50, 51, 52, 60, 70, 80, 85, 89])
    for q_pos in (torch.arange(70, 70 + r), torch.arange(78, 78 + r), torch.arange(5, 5 + r), spread):
        probs = attention_probs(segments, k, q_pos, 0.4)
        want = torch.zeros(h, r, m, dtype=torch.float64)
        slash = torch.zeros(h, m, dtype=torch.float64)
        for head in range(h):
            for i in range(r):
                p = int(q_pos[i])
                s = torch.cat([k[head // 2, lo:hi].double() @ q[i, head].double() for lo, hi, q in segments]) * 0.4
                want[head, i, :p + 1] = torch.softmax(s[:p + 1], 0)
                for j in range(p + 1):
                    slash[head, p - j] += want[head, i, j]
        torch.testing.assert_close(probs.double(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(slash_scores(probs, q_pos).double(), slash, atol=1e-6, rtol=1e-5)


def test_estimating_a_subset_of_heads_equals_those_rows_of_the_full_estimate():
    # a layer's A-shape and block-sparse heads are not estimated: the vertical-slash heads must come out the same
    from megactx.attention.sparse.estimate import attention_probs
    g = torch.Generator().manual_seed(3)
    h, hkv, d, m, r = 6, 2, 8, 300, 16
    segments = [(0, 120, torch.randn(r, h, d, generator=g)), (120, m, torch.randn(r, h, d, generator=g))]
    k = torch.randn(hkv, m, d, generator=g)
    q_pos = torch.arange(m - r, m)
    budgets_v, budgets_s = torch.tensor([40, 60, 31, 45, 50, 35]), torch.tensor([120, 130, 150, 101, 90, 110])
    full = estimate_vertical_slash(segments, k, q_pos, d ** -0.5, budgets_v, budgets_s, mass=0.9)
    full_probs = attention_probs(segments, k, q_pos, d ** -0.5)
    for heads in ([1, 4], [0, 1, 2], [5], [2, 3]):  # within one KV group, across both, the last head alone
        sel = torch.tensor(heads)
        torch.testing.assert_close(attention_probs(segments, k, q_pos, d ** -0.5, sel), full_probs[sel])
        part = estimate_vertical_slash(segments, k, q_pos, d ** -0.5, budgets_v[sel], budgets_s[sel], mass=0.9,
                                       heads=sel)
        for row, head in enumerate(heads):  # compare as sets: padding repeats an index up to the widest budget
            assert set(part.verticals[row].tolist()) == set(full.verticals[head].tolist())
            assert set(part.slashes[row].tolist()) == set(full.slashes[head].tolist())


def test_estimating_a_few_heads_per_pass_equals_one_pass(monkeypatch):
    # the probabilities are computed a few heads at a time through one buffer: any pass size, the same result
    import megactx.attention.sparse.estimate as estimate
    g = torch.Generator().manual_seed(4)
    h, hkv, d, m, r = 6, 2, 8, 300, 16
    segments = [(0, 120, torch.randn(r, h, d, generator=g)), (120, m, torch.randn(r, h, d, generator=g))]
    k = torch.randn(hkv, m, d, generator=g)
    q_pos = torch.arange(m - r, m)
    one = estimate_vertical_slash(segments, k, q_pos, d ** -0.5, 40, 120)
    for heads_per_pass in (1, 4):  # 4: the last pass is short
        monkeypatch.setattr(estimate, "PASS_ELEMENTS", heads_per_pass * r * m)
        few = estimate_vertical_slash(segments, k, q_pos, d ** -0.5, 40, 120)
        assert torch.equal(few.verticals, one.verticals) and torch.equal(few.slashes, one.slashes)


def test_estimate_of_bf16_inputs_equals_the_fp32_estimate_of_the_same_values():
    # a bf16 model's keys and queries are scored in fp32 (keys converted once per estimate): the same choice as
    # the fp32 estimate of the very same values
    g = torch.Generator().manual_seed(9)
    h, hkv, d, m, r = 6, 2, 8, 300, 16
    segments = [(0, 120, torch.randn(r, h, d, generator=g).bfloat16()),
                (120, m, torch.randn(r, h, d, generator=g).bfloat16())]
    k = torch.randn(hkv, m, d, generator=g).bfloat16()
    q_pos = torch.arange(m - r, m)
    as_fp32 = estimate_vertical_slash([(lo, hi, q.float()) for lo, hi, q in segments], k.float(), q_pos, d ** -0.5,
                                      40, 120, mass=0.9)
    got = estimate_vertical_slash(segments, k, q_pos, d ** -0.5, 40, 120, mass=0.9)
    assert torch.equal(got.verticals, as_fp32.verticals) and torch.equal(got.slashes, as_fp32.slashes)





def test_estimates_through_one_workspace_equal_fresh_buffers():
    """The buffers kept across estimates (grown when needed: the probabilities, the fp32 copy of bf16 keys)
    change no result."""
    from megactx.attention.sparse.estimate import Workspace
    g = torch.Generator().manual_seed(7)
    h, hkv, d, r = 4, 2, 8, 16
    workspace = Workspace()
    for m, dtype in ((300, torch.float32), (500, torch.bfloat16), (400, torch.float32), (450, torch.bfloat16)):
        q = (torch.randn(r, h, d, generator=g) * 3).to(dtype)
        k = torch.randn(hkv, m, d, generator=g).to(dtype)
        q_pos = torch.arange(m - r, m)
        fresh = estimate_vertical_slash(q, k, q_pos, d ** -0.5, 40, 120, mass=0.9)
        reused = estimate_vertical_slash(q, k, q_pos, d ** -0.5, 40, 120, mass=0.9, workspace=workspace)
        assert torch.equal(fresh.verticals, reused.verticals) and torch.equal(fresh.slashes, reused.slashes)
        if m == 500:
            grown = workspace._flat["probs"].data_ptr()
    assert workspace._flat["probs"].data_ptr() == grown  # the smaller estimates after it reused the buffer
    assert workspace._flat["keys"].numel() == hkv * 500 * d  # bf16 keys went through it, fp32 ones did not
