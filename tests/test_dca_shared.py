"""Shared-distance weighting: the closed-form multiplicity equals counting the keys at each apparent distance, the
weighted fast path equals the weighted reference at any chunked-prefill split and block size, and the weighting
changes nothing while no two keys share a distance."""
import pytest
import torch

from megactx.attention import dca_shared
from megactx.attention.dca import reference_dual_chunk_attention, temperature_scale
from megactx.attention.dca_distances import log_multiplicity, reference_log_multiplicity
from megactx.config import DCAConfig, EngineConfig
from megactx.errors import ConfigError
from test_dca import D, _qkv, _rotary, _run_backend

GEOMETRIES = [dict(chunk_size=16, local_size=8), dict(chunk_size=40, local_size=8), dict(chunk_size=17, local_size=3)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_closed_form_multiplicity_counts_the_keys_at_each_distance(geometry):
    cfg = DCAConfig(**geometry, original_max_position=16, temperature="none", weigh_shared_distances=True)
    rows, keys = torch.arange(200), torch.arange(200)
    table = log_multiplicity(rows, keys, cfg)
    for p in range(200):
        torch.testing.assert_close(table[p, :p + 1], reference_log_multiplicity(p, cfg))
        assert bool(torch.isneginf(table[p, p + 1:]).all())
    assert float(table.max().exp()) > 2  # the geometries reach distances held by three keys or more


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("splits,block", [([110], 512), ([13] * 8 + [6], 512), ([31, 1, 33, 40, 4, 1], 512),
                                          ([90] + [1] * 20, 7), ([31, 1, 33, 40, 4, 1], 7)])
def test_weighted_fast_path_equals_weighted_reference(geometry, splits, block, monkeypatch):
    monkeypatch.setattr(dca_shared, "BLOCK", block)  # 7: many blocks, some joined, some with explicit scores
    cfg = DCAConfig(**geometry, original_max_position=16, temperature="position", weigh_shared_distances=True)
    rotary = _rotary()
    q, k, v = _qkv(110, seed=5)
    q_scale = temperature_scale(torch.arange(110), torch.full((110,), 110), cfg)
    expected = reference_dual_chunk_attention(q, k, v, rotary, cfg, D ** -0.5, q_scale)
    torch.testing.assert_close(_run_backend(q, k, v, cfg, rotary, splits), expected, atol=2e-5, rtol=1e-4)
    plain = DCAConfig(**geometry, original_max_position=16, temperature="position")
    unweighted = reference_dual_chunk_attention(q, k, v, rotary, plain, D ** -0.5, q_scale)
    assert not torch.allclose(unweighted, expected, atol=1e-3)  # the weighting is on


def test_weighting_changes_nothing_up_to_chunk_size_plus_one():
    q, k, v = _qkv(41, seed=6)
    rotary = _rotary()
    weighted = DCAConfig(chunk_size=40, local_size=8, original_max_position=40, temperature="none",
                         weigh_shared_distances=True)
    plain = DCAConfig(chunk_size=40, local_size=8, original_max_position=40, temperature="none")
    torch.testing.assert_close(_run_backend(q, k, v, weighted, rotary, [20, 1, 20]),
                               reference_dual_chunk_attention(q, k, v, rotary, plain, D ** -0.5))


def test_weighting_with_context_parallelism_is_refused():
    with pytest.raises(ConfigError, match="--dca-weigh-shared-distances with --context-parallel-size"):
        EngineConfig.from_kwargs(model="m", context_parallel_size=2, dca_weigh_shared_distances=True)
