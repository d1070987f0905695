"""The pooled block estimate (`--sparse-estimate pooled`): its scores and plans against their row-by-row
definitions, inside DCA against the naive DCA reference under the recorded plans, everything kept equals dense,
and its settings' errors."""
import json

import pytest
import torch

from megactx.attention.dca import reference_dual_chunk_attention
from megactx.attention.sparse.probe import SparseProbe
from megactx.config import DCAConfig, SparseConfig
from megactx.errors import ConfigError
from megactx.attention.sparse import pooled
from megactx.attention.sparse.patterns import CONFIG_NAME, resolve_sparse
from megactx.config.attention import POOLED_CUTOFF
from megactx.attention.sparse.pooled import pooled_plan, pooled_scores, reference_pooled_plan, reference_pooled_scores
from helpers import engine_logits, token_ids
from test_dca import D, _qkv
from test_sparse import _run_sparse_dca, recorded_mask

DCA = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="none")


@pytest.fixture
def small_groups(monkeypatch):
    # 8-key groups: the tests' sequences of a few hundred keys get dozens of groups, not four
    monkeypatch.setattr(pooled, "GROUP", 8)


def _segments(n: int, h: int, bounds: list[int], seed: int = 0):
    """Key segments [bounds[i], bounds[i + 1]) each with its own random queries, as DCA's parts."""
    g = torch.Generator().manual_seed(seed)
    return [(lo, hi, torch.randn(n, h, 16, generator=g)) for lo, hi in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("q_start,n,block,stride", [(0, 70, 16, 1), (45, 61, 16, 1), (100, 50, 32, 4), (37, 40, 16, 3)])
def test_pooled_scores_are_the_row_by_row_definition(small_groups, q_start, n, block, stride):
    m = q_start + n
    k = torch.randn(2, m + 5, 16)  # keys beyond the chunk's end exist in a cache and must not be read
    bounds = [0, q_start // 3, q_start // 3 + 11, m] if q_start else [0, m]
    segments = _segments(n, 4, sorted(set(bounds)))
    fast = pooled_scores(segments, k, q_start, block, 0.25, row_stride=stride)
    ref = reference_pooled_scores(segments, k, q_start, block, 0.25, row_stride=stride)
    torch.testing.assert_close(fast, ref.float(), atol=1e-5, rtol=1e-5)
    rows = [len(range(min(n, a + block) - 1, a - 1, -stride)) for a in range(0, n, block)]
    torch.testing.assert_close(fast.sum(-1), torch.tensor(rows, dtype=torch.float32).expand(4, -1))  # a softmax a row


def test_group_sums_kept_per_sequence_equal_fresh_ones(small_groups, tiny_dir):
    """Each chunk of a long prompt sums only its own 64-key groups, the earlier ones kept per layer and sequence:
    always the sums of every whole group; another sequence, or the same one computed again from an earlier
    position (after preemption, with other keys there), starts over."""
    from megactx.attention.sparse.prefill import SparsePrefill
    cfg, patterns = resolve_sparse(SparseConfig(estimate="pooled"), None)
    prefill = SparsePrefill(cfg, patterns, 1, 4, 0.25)
    k = torch.randn(2, 400, 16)
    for q_start, m in [(0, 70), (70, 150), (150, 151), (151, 300)]:  # pieces of one sequence
        torch.testing.assert_close(prefill.whole_group_sums(0, 7, k, q_start, m), pooled.group_sums(k, 0, m // 8))
    assert prefill.kept_sums[0][1].shape[1] == 300 // 8
    other = torch.randn(2, 400, 16)
    torch.testing.assert_close(prefill.whole_group_sums(0, 8, other, 300, 340), pooled.group_sums(other, 0, 340 // 8))
    prefill.whole_group_sums(0, 7, k, 0, 300)
    torch.testing.assert_close(prefill.whole_group_sums(0, 7, other, 100, 200), pooled.group_sums(other, 0, 200 // 8))
    assert 0 not in SparsePrefill(cfg, patterns, 1, 4, 0.25).kept_sums  # nothing kept without a sequence id
    # in the engine: a second prompt on the same engine gets the logits of a fresh engine
    from megactx.config import EngineConfig
    from megactx.engine.llm_engine import LLMEngine
    path = tiny_dir("qwen2")

    def engine():
        return LLMEngine(EngineConfig.from_kwargs(path, dtype="fp32", max_num_batched_tokens=96, sparse_threshold=0,
                                                  sparse_estimate="pooled", sparse_mass=0.3, sparse_block_size=32,
                                                  sparse_max_density=1.0, sparse_dense_tail=0))
    used = engine()
    engine_logits(used, token_ids(300, seed=1))
    torch.testing.assert_close(engine_logits(used, token_ids(300, seed=2)), engine_logits(engine(), token_ids(300, seed=2)))


def test_a_bf16_cache_is_estimated_in_place_as_its_fp32_copy(small_groups):
    """The engine hands the estimate a bf16 cache as it is (summed in fp32, no fp32 copy of every key): the group
    means, and the pooled and coarse-to-fine scores from them, are those of the same keys converted first."""
    from megactx.attention.sparse import coarse
    k = torch.randn(2, 301, 16).to(torch.bfloat16)[:, :297]  # a slice of a cache, as KeySource.keys(raw=True) gives
    for m in (296, 297):  # whole groups, and a last partial one
        for got, want in zip(pooled.group_means(k, m), pooled.group_means(k.float(), m)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    segments = _segments(97, 4, [0, 120, 200, 297])
    torch.testing.assert_close(pooled_scores(segments, k, 200, 32, 0.25), pooled_scores(segments, k.float(), 200, 32, 0.25))
    torch.testing.assert_close(coarse.coarse_to_fine_scores(segments, k, 200, 32, 0.25, 2),
                               coarse.coarse_to_fine_scores(segments, k.float(), 200, 32, 0.25, 2))


@pytest.mark.parametrize("cutoff", [0.2, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("q_start,parts", [(96, []), (133, [(40, 90), (0, 40)])])
def test_pooled_plan_is_its_definition_and_keeps_sinks_local_and_part_groups(small_groups, cutoff, q_start, parts):
    n, block = 70, 16
    segments = _segments(n, 4, [0, q_start + n], seed=1)
    score = pooled_scores(segments, torch.randn(2, q_start + n, 16), q_start, block, 0.5, row_stride=1)
    fast = pooled_plan(score, q_start, n, block, cutoff, parts)
    ref = reference_pooled_plan(score, q_start, n, block, cutoff, parts)
    assert [[b.ranges for b in head] for head in fast] == [[b.ranges for b in head] for head in ref]
    for head in fast:
        for i, a in enumerate(range(q_start, q_start + n, block)):
            keys = set(head[i].indices().tolist())
            assert keys <= set(range(a)) and {0, a - 1} <= keys  # sinks and the keys just before the block
            assert all(lo in keys for lo, hi in parts)
            if cutoff == 1.0:
                assert keys == set(range(a))
    if cutoff <= 0.5:  # really sparse: fewer keys than all those before the blocks
        assert sum(b.size() for head in fast for b in head) < 4 * sum(range(q_start, q_start + n, block))


@pytest.mark.parametrize("cutoff", [0.8, 1.0])
@pytest.mark.parametrize("max_keys", [8, 24, 64])
def test_a_key_budget_caps_each_block_at_its_best_groups(small_groups, cutoff, max_keys):
    """max_keys: at most max_keys // GROUP groups besides the forced ones, whatever the context's length; the
    best ones by estimate; the same as the definition."""
    n, q_start, block, parts = 64, 400, 16, [(0, 200), (200, 464)]
    score = pooled_scores(_segments(n, 4, [0, q_start + n], seed=3), torch.randn(2, q_start + n, 16), q_start,
                          block, 0.5, row_stride=1)
    fast = pooled_plan(score, q_start, n, block, cutoff, parts, max_keys=max_keys)
    ref = reference_pooled_plan(score, q_start, n, block, cutoff, parts, max_keys=max_keys)
    assert [[b.ranges for b in head] for head in fast] == [[b.ranges for b in head] for head in ref]
    uncapped = pooled_plan(score, q_start, n, block, cutoff, parts)
    forced = pooled.forced_groups(q_start, n, block, score.shape[-1], parts)
    for head, free in zip(fast, uncapped):
        for i, (capped, full) in enumerate(zip(head, free)):
            groups = {k // 8 for k in capped.indices().tolist()}
            assert len(groups - set(forced[i].nonzero().flatten().tolist())) <= max_keys // 8
            assert set(capped.indices().tolist()) <= set(full.indices().tolist())  # the best of the same choice


def test_a_higher_cutoff_keeps_a_superset_with_more_estimated_attention(small_groups):
    n, q_start, block = 64, 192, 32
    score = pooled_scores(_segments(n, 4, [0, q_start + n], seed=2), torch.randn(2, q_start + n, 16), q_start,
                          block, 0.5)
    kept = []
    for cutoff in (0.3, 0.6, 0.9):
        plan = pooled_plan(score, q_start, n, block, cutoff)
        kept.append([[set(b.indices().tolist()) for b in head] for head in plan])
    for low, high in zip(kept, kept[1:]):
        assert all(a <= b for hl, hh in zip(low, high) for a, b in zip(hl, hh))
    assert kept[0] != kept[-1]


def test_pooled_inside_dca_equals_the_reference_under_the_plan(small_groups):
    """Each group is scored with the rotation of the DCA part its first key is in; the plan's keys are computed
    with the rotation of the part each key is in, which the naive DCA reference under the plan's mask checks."""
    t = 150
    q, k, v = _qkv(t, seed=4)
    out, plans, rotary = _run_sparse_dca(q, k, v, DCA, [70, 80], (1000, 6096), block=16, estimate="pooled", mass=0.6)
    mask = recorded_mask(plans, t)
    assert not bool(mask[:, torch.ones(t, t, dtype=torch.bool).tril()].all())  # really sparse
    expected = reference_dual_chunk_attention(q, k, v, rotary, DCA, D ** -0.5, mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("splits", [[150], [61, 89]])
def test_pooled_keeping_everything_inside_dca_equals_dense_dca(small_groups, splits):
    q, k, v = _qkv(150)
    out, _, rotary = _run_sparse_dca(q, k, v, DCA, splits, (1000, 6096), estimate="pooled", mass=1.0)
    torch.testing.assert_close(out, reference_dual_chunk_attention(q, k, v, rotary, DCA, D ** -0.5),
                               atol=2e-5, rtol=1e-4)


def test_engine_pooled_keeping_everything_equals_dense_and_a_cutoff_computes_less(tiny_dir):
    from megactx.config import EngineConfig
    from megactx.engine.llm_engine import LLMEngine
    path = tiny_dir("qwen2")
    ids = token_ids(400)

    def run(**kw):
        e = LLMEngine(EngineConfig.from_kwargs(path, dtype="fp32", max_num_batched_tokens=200, sparse_dense_tail=0,
                                               **kw))
        probe = SparseProbe()
        e.observe_sparse(probe)
        return engine_logits(e, ids), e, probe

    dense, _, _ = run(sparse=False)
    assert run(sparse_threshold=0)[1].sparse.estimate == "pooled"  # the engine's default without a budgets file
    full, _, probe = run(sparse_threshold=0, sparse_estimate="pooled", sparse_mass=1.0, sparse_block_size=32,
                         sparse_max_density=1.0)
    assert probe.attention_s and not probe.fallbacks
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)
    _, _, probe = run(sparse_threshold=0, sparse_estimate="pooled", sparse_mass=0.3, sparse_block_size=32,
                      sparse_max_density=1.0)
    planned = [c.density for c in probe.calls]
    assert planned and min(planned) < 1.0  # the 64-key groups of 400 tokens leave something out at cut-off 0.3
    _, _, probe = run(sparse_threshold=0, sparse_estimate="pooled", sparse_mass=1.0, sparse_block_size=32,
                      sparse_max_density=1.0, sparse_max_keys=64)
    # everything by cut-off, but one chosen group besides the sinks and the local group: 3 to 6 groups lie before
    # each block of the second chunk
    assert probe.calls and all(c.density < 0.9 for c in probe.calls if c.q_start >= 200)


def test_pooled_settings_are_checked_and_described():
    cfg = SparseConfig(estimate="pooled", block_size=256)
    assert cfg.pooled_cutoff == POOLED_CUTOFF == 0.7
    assert "pooled block estimate" in cfg.describe() and "cut-off 0.7" in cfg.describe()
    assert SparseConfig(estimate="pooled", mass=0.9).pooled_cutoff == 0.9
    with pytest.raises(ConfigError, match="--sparse-estimate 'columns': choose one of auto, vertical-slash, pooled"):
        SparseConfig(estimate="columns")


def test_auto_estimate_is_pooled_unless_budgets_are_given(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")

    def resolved(**settings):
        return resolve_sparse(SparseConfig(**settings), model)

    assert resolved()[0].estimate == "pooled"  # no budgets anywhere: the pooled estimate
    assert resolved()[0].block_size == 256  # fp32
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps([{"0": ["vertical_and_slash", 100, 800, 0.9]}]))
    given, patterns = resolved(config_file=str(budgets))
    assert given.estimate == "vertical-slash" and patterns.head(0, 0).vertical_size == 100
    assert resolved(config_file=str(budgets), estimate="pooled")[0].estimate == "pooled"  # asked for
    assert resolved(estimate="vertical-slash")[0].estimate == "vertical-slash"
    (tmp_path / CONFIG_NAME).write_text(budgets.read_text())
    assert resolved()[0].estimate == "vertical-slash"  # the budgets the model ships with
