"""The coarse-to-fine pooled estimate: its scores against the row-by-row definition, the pooled estimate exactly
when every super-group is refined, one softmax per estimating row."""
import pytest
import torch

from megactx.attention.sparse import coarse, pooled
from megactx.attention.sparse.coarse import coarse_to_fine_scores, reference_coarse_to_fine_scores
from megactx.attention.sparse.pooled import pooled_scores


@pytest.fixture
def small(monkeypatch):
    # 8-key groups and 32-key super-groups: a few hundred keys make a dozen super-groups
    monkeypatch.setattr(pooled, "GROUP", 8)
    monkeypatch.setattr(coarse, "SUPER", 32)


def _segments(n: int, h: int, bounds: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(lo, hi, torch.randn(n, h, 16, generator=g)) for lo, hi in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("q_start,n,block,stride,refine", [
    (0, 70, 16, 1, 1), (300, 64, 16, 1, 2), (301, 61, 32, 4, 3), (190, 40, 16, 3, 0)])
@pytest.mark.parametrize("dca", [False, True])
def test_coarse_to_fine_scores_are_the_row_by_row_definition(small, q_start, n, block, stride, refine, dca):
    m = q_start + n
    k = torch.randn(2, m + 7, 16)
    bounds = [0, q_start // 3 + 5, q_start // 2 + 17, m] if dca and q_start else [0, m]
    segments = _segments(n, 4, sorted(set(bounds)), seed=q_start)
    fast = coarse_to_fine_scores(segments, k, q_start, block, 0.25, refine, row_stride=stride)
    ref = reference_coarse_to_fine_scores(segments, k, q_start, block, 0.25, refine, row_stride=stride)
    torch.testing.assert_close(fast, ref.float(), atol=1e-5, rtol=1e-5)
    rows = [len(range(min(n, a + block) - 1, a - 1, -stride)) for a in range(0, n, block)]
    torch.testing.assert_close(fast.sum(-1), torch.tensor(rows, dtype=torch.float32).expand(4, -1))


def test_refining_every_super_group_is_the_pooled_estimate(small):
    q_start, n, block = 250, 90, 32
    segments = _segments(n, 4, [0, 100, q_start + n], seed=5)
    k = torch.randn(2, q_start + n, 16)
    torch.testing.assert_close(coarse_to_fine_scores(segments, k, q_start, block, 0.3, refine=100),
                               pooled_scores(segments, k, q_start, block, 0.3), atol=1e-5, rtol=1e-5)


def test_the_engine_plans_with_it_and_checks_its_setting(tiny_dir, monkeypatch):
    """Through the engine (super-groups of 64 keys, so 400 tokens make several): refining every super-group keeps
    the result of the pooled estimate; refining none still computes a correct-shaped, sparser prefill."""
    from helpers import engine_logits, token_ids
    from megactx.attention.sparse.probe import SparseProbe
    from megactx.config import EngineConfig, SparseConfig
    from megactx.engine.llm_engine import LLMEngine
    from megactx.errors import ConfigError
    monkeypatch.setattr(coarse, "SUPER", 64)
    path, ids = tiny_dir("qwen2"), token_ids(400)

    def run(**kw):
        e = LLMEngine(EngineConfig.from_kwargs(path, max_num_batched_tokens=200, sparse_threshold=0,
                                               sparse_dense_tail=0, sparse_estimate="pooled", sparse_block_size=32,
                                               sparse_max_density=1.0, sparse_mass=0.5, **kw))
        probe = SparseProbe()
        e.observe_sparse(probe)
        return engine_logits(e, ids), probe

    pooled_logits, pooled_probe = run()
    all_refined, probe = run(sparse_coarse_refine=100)
    torch.testing.assert_close(all_refined, pooled_logits, atol=1e-5, rtol=1e-5)
    assert [c.density for c in probe.calls] == pytest.approx([c.density for c in pooled_probe.calls])
    _, probe = run(sparse_coarse_refine=0)
    assert probe.calls and all(c.density < 1 for c in probe.calls if c.q_start >= 200)
    with pytest.raises(ConfigError, match="coarse-refine"):
        SparseConfig(coarse_refine=-1)
    assert "3 super-groups refined" in SparseConfig(estimate="pooled", coarse_refine=3).describe()
