"""Sparse prefill in the engine: full budgets give dense attention exactly (plain and inside DCA), partial budgets
inside DCA equal the naive DCA reference under the recorded plan's mask, chunks planned in parts, the dense
fallback, and the config file's errors. The plans and the kernel alone: test_sparse_kernel.py."""
import json

import pytest
import torch

from megactx.attention.backend import AttentionMetadata, KVCacheTensors, SeqAttention
from megactx.attention.dca import DualChunkAttentionBackend, reference_dual_chunk_attention
from megactx.attention.sparse.patterns import (DEFAULT_HEAD, HeadPattern, SparsePatterns, load_patterns,
                                               resolve_sparse)
from megactx.attention.sparse.plan import plan_mask
from megactx.attention.sparse.prefill import SparsePrefill
from megactx.attention.sparse.probe import SparseProbe
from megactx.config import DCAConfig, SparseConfig
from megactx.errors import ConfigError
from megactx.layers.rotary import apply_rotary
from helpers import engine_logits, token_ids
from test_dca import D, H, HKV, _qkv, _rotary

def _run_sparse_dca(q, k, v, dca, splits, budgets, block=16, max_density=1.0, probes=None, span=8192, **settings):
    """The DCA backend with sparse prefill on, fed in chunks; returns outputs and the recorded plans.
    max_density 1.0: the sparse kernel computes every chunk (no dense fallback) unless the test says otherwise."""
    t = q.shape[0]
    rotary = _rotary()
    settings.setdefault("estimate", "vertical-slash")
    settings.setdefault("dense_tail", 0)
    cfg = SparseConfig(threshold=0, last_q=8, block_size=block, max_density=max_density, estimate_span=span,
                       **settings)
    patterns = SparsePatterns([{h: HeadPattern("vertical_and_slash", *budgets) for h in range(H)}])
    sparse = SparsePrefill(cfg, patterns, 1, H, D ** -0.5)
    probe = SparseProbe(record_plans=True)
    sparse.observe(probe)
    cache = KVCacheTensors(1, HKV, D, t, torch.float32, torch.device("cpu"))
    backend = DualChunkAttentionBackend(H, HKV, D, cache, dca, rotary, sparse)
    outs, c = [], 0
    for n in splits:
        pos = torch.arange(c, c + n)
        meta = AttentionMetadata([SeqAttention(0, n, c, slice(0, c + n), sparse=True, prompt_len=t)],
                                 slice(c, c + n))
        key_pos = backend.begin_step(meta, pos, torch.full((n,), c + n))
        k_rot = apply_rotary(k[c:c + n], *rotary.cos_sin(key_pos))
        outs.append(backend(0, q[c:c + n], k_rot, v[c:c + n]))
        c += n
    if probes is not None:
        probes.append(probe)
    return torch.cat(outs), [(call.layer, call.q_start, call.plan) for call in probe.calls], rotary


def recorded_mask(plans, t: int, block: int = 16) -> torch.Tensor:
    """[H, t, t] the keys the recorded plans computed: one plan per piece, rows [q_start, q_start + n)."""
    mask = torch.zeros(H, t, t, dtype=torch.bool)
    for _, q_start, plan in plans:
        piece = plan_mask(plan, q_start, min(len(plan[0]) * block, t - q_start), block, t)
        mask[:, q_start:q_start + piece.shape[1]] = piece
    return mask


@pytest.mark.parametrize("splits", [[150], [61, 89], [33, 50, 67]])
def test_full_budgets_inside_dca_equal_dense_dca(splits):
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="none")
    q, k, v = _qkv(150)
    out, _, rotary = _run_sparse_dca(q, k, v, dca, splits, (1000, 1000))
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_partial_budgets_inside_dca_equal_the_reference_under_the_plan():
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="none")
    t = 150
    q, k, v = _qkv(t, seed=4)
    out, plans, rotary = _run_sparse_dca(q, k, v, dca, [70, 80], (31, 50), block=16)
    mask = recorded_mask(plans, t)
    assert not bool(mask.all(-1).all())  # really sparse
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5, mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_the_prompts_dense_tail_attends_to_every_key_inside_dca():
    """The prompt's last dense_tail rows are computed densely, the rows before them by their plans: the output is
    the DCA reference under the recorded plans' mask with the tail's rows unmasked, and no plan covers a tail row.
    The tail starts inside the second chunk and spans a DCA piece boundary (pieces of 32 rows)."""
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="none")
    t, tail = 150, 40
    q, k, v = _qkv(t, seed=4)
    out, plans, rotary = _run_sparse_dca(q, k, v, dca, [70, 80], (31, 50), block=16, dense_tail=tail)
    assert max(q_start + len(plan[0]) * 16 for _, q_start, plan in plans) <= t - tail + 16  # plans end at the tail
    mask = recorded_mask(plans, t)
    mask[:, t - tail:] = True  # the tail: every key (causality and DCA's parts come from the reference)
    assert not bool(mask[:, :t - tail].all(-1).all())  # the rows before it really are sparse
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5, mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    # the whole prompt in the tail: dense DCA exactly, no plan at all
    out, plans, rotary = _run_sparse_dca(q, k, v, dca, [70, 80], (31, 50), block=16, dense_tail=t)
    assert not plans
    torch.testing.assert_close(out, reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5),
                               atol=2e-5, rtol=1e-4)


def test_the_prompts_dense_tail_in_the_engine_is_the_dense_rows(tiny_dir):
    """Plain (non-DCA) backend in the engine: with the tail covering the second chunk, that chunk's rows match
    dense attention (the logits of a dense engine), and the first chunk stays sparse."""
    from megactx.config import EngineConfig
    from megactx.engine.llm_engine import LLMEngine
    ids = token_ids(400, seed=2)

    def run(**kw):
        e = LLMEngine(EngineConfig.from_kwargs(tiny_dir("qwen2"), dtype="fp32", max_num_batched_tokens=200, **kw))
        probe = SparseProbe()
        e.observe_sparse(probe)
        return engine_logits(e, ids), probe

    dense, _ = run(sparse=False)
    sparse = dict(sparse_threshold=0, sparse_estimate="pooled", sparse_mass=0.3, sparse_block_size=32,
                  sparse_max_density=1.0)
    no_tail, _ = run(sparse_dense_tail=0, **sparse)
    tail, probe = run(sparse_dense_tail=200, **sparse)
    assert probe.calls and all(c.q_start < 200 for c in probe.calls)  # the first chunk: planned
    assert (no_tail[200:] - dense[200:]).abs().max() > 1e-3  # the cut-off changes the second chunk without a tail
    torch.testing.assert_close(tail[:200], no_tail[:200], atol=1e-5, rtol=1e-5)
    # the tail's rows attend to every key, but the layers below read the first chunk's sparse keys and values
    assert (tail[200:] - dense[200:]).abs().max() < (no_tail[200:] - dense[200:]).abs().max()


def test_dense_tail_is_checked():
    with pytest.raises(ConfigError, match="sparse-dense-tail"):
        SparseConfig(dense_tail=-1)
    cfg = SparseConfig(dense_tail=100)
    assert cfg.sparse_end(0, 500, 500) == 400 and cfg.sparse_end(450, 500, 500) == 450
    assert cfg.sparse_end(0, 300, 1000) == 300  # a chunk before the tail: all sparse


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
    with pytest.raises(ConfigError, match="sparse_estimate_span"):
        SparseConfig(estimate_span=-1)


def test_a_chunk_planned_in_parts_equals_chunks_of_the_part_size_inside_dca():
    # DCA pieces of 32 rows (chunk_len 40 - 8), each planned in two parts of 16 rows from their own last queries:
    # the same plans and output as 16-row prefill chunks with one estimate each
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="none")
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
    dca = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="none")
    q, k, v = _qkv(150)
    probes = []
    out, _, rotary = _run_sparse_dca(q, k, v, dca, [61, 89], (1000, 1000), max_density=0.6, probes=probes)
    expected = reference_dual_chunk_attention(q, k, v, rotary, dca, D ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    pieces = len(probes[0].densities(0))
    assert probes[0].fallbacks[0] == pieces and all(p > 0.6 for p in probes[0].densities(0))
    assert probes[0].densities(0, computed=True) == [1.0] * pieces  # what was computed
    _run_sparse_dca(q, k, v, dca, [61, 89], (31, 50), max_density=0.99, probes=probes)
    sparse_pieces = sum(p <= 0.99 for p in probes[1].densities(0))
    assert sparse_pieces > 0 and probes[1].fallbacks.get(0, 0) == len(probes[1].densities(0)) - sparse_pieces


def test_engine_full_budgets_equal_dense_for_every_pattern(tiny_dir, tmp_path):
    from megactx.engine.llm_engine import LLMEngine
    from megactx.config import EngineConfig
    path = tiny_dir("qwen2")
    cfg_file = tmp_path / "sparse.json"
    heads = {"0": ["vertical_and_slash", 4096, 4096, 0.9], "1": ["a_shape", 4096, 4096, 0.9],
             "2": ["block_sparse", 4096, 0, 0.9], "3": ["stream_llm", 4096, 4096, 0.9]}
    cfg_file.write_text(json.dumps([heads, heads]))
    ids = token_ids(300)

    def logits(**kw):
        e = LLMEngine(EngineConfig.from_kwargs(path, dtype="fp32", max_num_batched_tokens=120, **kw))
        probe = SparseProbe()
        e.observe_sparse(probe)
        return engine_logits(e, ids), probe

    dense, _ = logits(sparse=False)
    sparse, probe = logits(sparse_threshold=0, sparse_config=str(cfg_file), sparse_block_size=32,
                           sparse_max_density=1.0)
    assert probe.attention_s and not probe.fallbacks  # the sparse kernel ran on every chunk
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    fallback, probe = logits(sparse_threshold=0, sparse_config=str(cfg_file), sparse_block_size=32)
    assert sum(probe.fallbacks.values()) == len(probe.calls)  # dense plans: dense path
    torch.testing.assert_close(fallback, dense, atol=1e-4, rtol=1e-4)
    _, below = logits(sparse_threshold=300, sparse_config=str(cfg_file), sparse_block_size=32)
    assert not below.calls  # a prompt of 300 tokens is not above 300: dense


def test_engine_chunk_planned_in_parts_equals_smaller_chunks(tiny_dir, tmp_path):
    # the dense (non-DCA) backend: a 120-row chunk planned in three 40-row parts is 40-row chunks, plan for plan
    from megactx.engine.llm_engine import LLMEngine
    from megactx.config import EngineConfig
    cfg_file = tmp_path / "sparse.json"
    cfg_file.write_text(json.dumps([{str(h): ["vertical_and_slash", 40, 60, 0.9] for h in range(4)}] * 2))
    ids = token_ids(240, seed=3)

    def run(chunk, span):
        e = LLMEngine(EngineConfig.from_kwargs(tiny_dir("qwen2"), max_num_batched_tokens=chunk, sparse_threshold=0,
                                               sparse_dense_tail=0, sparse_config=str(cfg_file), sparse_block_size=16, sparse_last_q=8,
                                               sparse_max_density=1.0, sparse_estimate_span=span))
        probe = SparseProbe(record_plans=True)
        e.observe_sparse(probe)
        logits = engine_logits(e, ids)
        plans = [(c.layer, c.q_start, c.plan) for c in probe.calls]
        return logits, sorted(_plan_ranges(plans), key=lambda p: p[:2]), probe

    in_parts, plans_parts, probe = run(120, 40)
    in_chunks, plans_chunks, _ = run(40, 0)
    assert [q_start for layer, q_start, _ in plans_parts if layer == 0] == list(range(0, 240, 40))
    assert min(c.density for c in probe.calls) < 0.9  # really sparse: the last parts skip keys
    assert plans_parts == plans_chunks
    torch.testing.assert_close(in_parts, in_chunks, atol=1e-5, rtol=1e-5)
    _, plans_whole, _ = run(120, 0)
    assert plans_whole != plans_parts  # the span changed what was computed


def test_config_file_parsing_and_errors(tmp_path):
    good = tmp_path / "sparse_attention_config.json"
    good.write_text(json.dumps([{"0": ["vertical_and_slash", 100, 800, 0.95], "3": ["stream_llm", 64, 512, 0.9]}]))
    cfg = load_patterns(good)
    assert cfg.head(0, 0) == HeadPattern("vertical_and_slash", 100, 800)
    assert cfg.head(0, 3) == HeadPattern("a_shape", 64, 512)
    assert cfg.head(0, 1) == DEFAULT_HEAD == HeadPattern("vertical_and_slash", 1000, 6096)
    assert cfg.head(5, 0) == DEFAULT_HEAD
    (tmp_path / "model.gguf").write_bytes(b"")
    assert resolve_sparse(SparseConfig(), tmp_path / "model.gguf")[0].config_file == str(good)  # beside the model
    assert resolve_sparse(SparseConfig(enabled=False), tmp_path / "model.gguf") is None
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
            load_patterns(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_patterns(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="sparse_last_q"):
        SparseConfig(last_q=0)


def test_mass_setting_is_checked():
    assert "mass cut-off 0.95" in SparseConfig(mass=0.95, estimate="vertical-slash").describe()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="--sparse-mass"):
            SparseConfig(mass=bad)
        with pytest.raises(ConfigError, match="--sparse-max-density"):
            SparseConfig(max_density=bad)


def test_kernel_block_height_follows_the_compute_dtype_unless_set(tiny_dir):
    """256-row blocks in fp32, 512 in bf16 (fewer, taller flash calls; default_block_size measures why);
    an explicit sparse_block_size wins. The engine's sparse config is the one its attention backend uses."""
    from megactx.config import EngineConfig
    from megactx.engine.llm_engine import LLMEngine
    path = tiny_dir("qwen2")
    for kw, rows in (({}, 256), ({"dtype": "bf16"}, 512), ({"dtype": "bf16", "sparse_block_size": 64}, 64)):
        engine = LLMEngine(EngineConfig.from_kwargs(path, **{"dtype": "fp32", **kw}))
        assert engine.sparse.block_size == rows
        assert engine.runner.backend.sparse.cfg.block_size == rows
