"""Sparse prefill in the engine: full budgets give dense attention exactly (plain and inside DCA), partial budgets
inside DCA equal the naive DCA reference under the recorded plan's mask, chunks planned in parts, the dense
fallback, and the config file's errors. The plans and the kernel alone: test_sparse_kernel.py."""
import json

import pytest
import torch

from megactx.attention.backend import AttentionMetadata, KVCacheTensors, SeqAttention
from megactx.attention.dca import DCAConfig, DualChunkAttentionBackend, reference_dual_chunk_attention
from megactx.errors import ConfigError
from megactx.layers.rotary import apply_rotary
from megactx.sparse.config import DEFAULT_HEAD, HeadPattern, SparseConfig, load_sparse_config, resolve_sparse
from megactx.sparse.plan import plan_mask
from megactx.sparse.prefill import SparsePrefill
from helpers import engine_logits, token_ids
from test_dca import D, H, HKV, _qkv, _rotary

def _run_sparse_dca(q, k, v, dca, splits, budgets, block=16, max_density=1.0, stats=None, span=8192,
                    exact_diagonals=False, slash_window=0, **settings):
    """The DCA backend with sparse prefill on, fed in chunks; returns outputs and the recorded plans.
    max_density 1.0: the sparse kernel computes every chunk (no dense fallback) unless the test says otherwise."""
    t = q.shape[0]
    rotary = _rotary()
    backend = DualChunkAttentionBackend(H, HKV, D, dca, rotary)
    backend.cache = KVCacheTensors(1, HKV, D, t, torch.float32, torch.device("cpu"))
    cfg = SparseConfig(threshold=0, last_q=8, block_size=block, max_density=max_density, estimate_span=span,
                       exact_diagonals=exact_diagonals, slash_window=slash_window, **settings,
                       layers=[{h: HeadPattern("vertical_and_slash", *budgets) for h in range(H)}])
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


def recorded_mask(plans, t: int, block: int = 16) -> torch.Tensor:
    """[H, t, t] the keys the recorded plans computed: one plan per piece, rows [q_start, q_start + n)."""
    mask = torch.zeros(H, t, t, dtype=torch.bool)
    for _, q_start, plan in plans:
        piece = plan_mask(plan, q_start, min(len(plan[0]) * block, t - q_start), block, t)
        mask[:, q_start:q_start + piece.shape[1]] = piece
    return mask


@pytest.mark.parametrize("splits", [[150], [61, 89], [33, 50, 67]])
def test_full_budgets_inside_dca_equal_dense_dca(splits):
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    q, k, v = _qkv(150)
    out, _, rotary = _run_sparse_dca(q, k, v, dca, splits, (1000, 1000))
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slash_window", [0, 8])
def test_partial_budgets_inside_dca_equal_the_reference_under_the_plan(slash_window):
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position_embeddings=20, temperature="none")
    t = 150
    q, k, v = _qkv(t, seed=4)
    out, plans, rotary = _run_sparse_dca(q, k, v, dca, [70, 80], (31, 50), block=16, slash_window=slash_window)
    mask = recorded_mask(plans, t)
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
    mask = recorded_mask(plans, t)
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
    assert "slashes in windows of 128" in SparseConfig(slash_window=128).describe()
    with pytest.raises(ConfigError, match="--sparse-slash-window"):
        SparseConfig(slash_window=-1)
    with pytest.raises(ConfigError, match="use one of them"):
        SparseConfig(mass=0.9, mass_union=True, slash_window=64)


def test_kernel_block_height_follows_the_compute_dtype_unless_set(tiny_dir):
    """256-row blocks in fp32, 512 in bf16 (fewer, taller flash calls; default_block_size measures why);
    an explicit sparse_block_size wins. The engine's sparse config is the one its attention backend uses."""
    from megactx.config import EngineConfig
    from megactx.engine.llm_engine import LLMEngine
    path = tiny_dir("qwen2")
    for kw, rows in (({}, 256), ({"dtype": "bf16"}, 512), ({"dtype": "bf16", "sparse_block_size": 64}, 64)):
        engine = LLMEngine(EngineConfig(model=path, **kw))
        assert engine.sparse.block_size == rows
        assert engine.runner.backend.sparse.cfg.block_size == rows
