"""Dual Chunk Attention: the fast path equals the naive reference (all three score sets written out) at any
chunked-prefill split, equals plain RoPE attention up to chunk_size + 1 tokens, and works end to end."""
import json
import os

import pytest
import torch

from megactx.attention.backend import AttentionMetadata, KVCacheTensors, SeqAttention
from megactx.attention.dca import DualChunkAttentionBackend, reference_dual_chunk_attention, temperature_scale
from megactx.attention.dca_distances import apparent_distances
from megactx.attention.dense import causal_mask, reference_attention
from megactx.config import DCAConfig, ModelConfig
from megactx.errors import ConfigError
from megactx.layers.rotary import RotaryEmbedding, apply_rotary
from helpers import engine_logits, token_ids

H, HKV, D = 4, 2, 16


def _rotary(theta=10000.0):
    cfg = ModelConfig(architecture="llama", vocab_size=10, hidden_size=H * D, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=H, num_key_value_heads=HKV, head_dim=D, rms_norm_eps=1e-6,
                      max_position_embeddings=64, rope_theta=theta)
    return RotaryEmbedding(cfg, torch.device("cpu"))


def _run_backend(q, k, v, cfg, rotary, splits, probe=None):
    """Feed one sequence through the backend in chunks of the given sizes, as the model runner does."""
    t = q.shape[0]
    cache = KVCacheTensors(1, HKV, D, t + 8, torch.float32, torch.device("cpu"))
    backend = DualChunkAttentionBackend(H, HKV, D, cache, cfg, rotary)
    backend.attention_probe = probe
    outs, c = [], 0
    for n in splits:
        pos = torch.arange(c, c + n)
        meta = AttentionMetadata([SeqAttention(0, n, c, slice(0, c + n), prompt_len=t)], slice(c, c + n))
        key_pos = backend.begin_step(meta, pos, torch.full((n,), c + n))
        k_rot = apply_rotary(k[c:c + n], *rotary.cos_sin(key_pos))
        outs.append(backend(0, q[c:c + n], k_rot, v[c:c + n]))
        c += n
    assert c == t
    return torch.cat(outs)


def _qkv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, H, D, generator=g), torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g))


@pytest.mark.parametrize("splits", [[150], [7] * 21 + [3], [1] * 150, [31, 1, 33, 64, 21], [100, 1, 1, 48]])
@pytest.mark.parametrize("temperature", ["none", "position"])
def test_fast_path_equals_reference_at_any_split(splits, temperature):
    cfg = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature=temperature)
    rotary = _rotary()
    q, k, v = _qkv(150)
    scale = D ** -0.5
    q_scale = temperature_scale(torch.arange(150), torch.full((150,), 150), cfg)
    expected = reference_dual_chunk_attention(q, k, v, rotary, cfg, scale, q_scale)
    torch.testing.assert_close(_run_backend(q, k, v, cfg, rotary, splits), expected, atol=2e-5, rtol=1e-4)


def test_total_length_temperature_in_one_pass():
    cfg = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="total")
    rotary = _rotary()
    q, k, v = _qkv(120, seed=1)
    q_scale = temperature_scale(torch.arange(120), torch.full((120,), 120), cfg)
    assert q_scale is not None and torch.allclose(q_scale, q_scale[0])  # one factor for the whole sequence
    expected = reference_dual_chunk_attention(q, k, v, rotary, cfg, D ** -0.5, q_scale)
    torch.testing.assert_close(_run_backend(q, k, v, cfg, rotary, [120]), expected, atol=2e-5, rtol=1e-4)


def test_equals_plain_rope_up_to_chunk_size_plus_one():
    cfg = DCAConfig(chunk_size=40, local_size=8, original_max_position=64, temperature="position")
    rotary = _rotary()
    q, k, v = _qkv(41, seed=2)
    pos = torch.arange(41)
    cos, sin = rotary.cos_sin(pos)
    plain = reference_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin).transpose(0, 1),
                                v.transpose(0, 1), D ** -0.5, causal_mask(41, 41))[0]
    torch.testing.assert_close(_run_backend(q, k, v, cfg, rotary, [16, 1, 24]), plain, atol=2e-5, rtol=1e-4)
    # one token more and the positions wrap: no longer plain RoPE
    q, k, v = _qkv(60, seed=2)
    cos, sin = rotary.cos_sin(torch.arange(60))
    plain = reference_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin).transpose(0, 1),
                                v.transpose(0, 1), D ** -0.5, causal_mask(60, 60))[0]
    assert not torch.allclose(_run_backend(q, k, v, cfg, rotary, [60])[45:], plain[45:], atol=1e-3)


def test_temperature_factor_values():
    cfg = DCAConfig(chunk_size=40, local_size=8, original_max_position=1000, temperature="position")
    scale = temperature_scale(torch.tensor([0, 999, 1999, 9999]), torch.full((4,), 10000), cfg)
    f = 0.1 * torch.log(torch.tensor([2.0, 10.0])) + 1
    torch.testing.assert_close(scale, torch.tensor([1.0, 1.0, f[0] ** 2, f[1] ** 2]))
    assert temperature_scale(torch.tensor([5]), torch.tensor([500]), cfg) is None  # all inside the trained length


def test_apparent_distances_are_the_distances_the_reference_scores_at():
    """RoPE scores depend on the relative position only, so the reference's score of key k for the row at p equals
    the plain score with the query rotated at apparent_distances(p)[k] and the key at 0."""
    cfg = DCAConfig(chunk_size=40, local_size=8, original_max_position=40, temperature="none")
    rotary = _rotary()
    q, k, v = _qkv(130, seed=3)
    _, probs = reference_dual_chunk_attention(q, k, v, rotary, cfg, D ** -0.5, return_probs=True)
    k0 = apply_rotary(k[:, :1].float(), *rotary.cos_sin(torch.zeros(130, dtype=torch.long)))  # head 0's kv head
    for p in (20, 39, 40, 41, 75, 129):
        shown = apparent_distances(p, cfg)
        q_shown = apply_rotary(q[p:p + 1, :1].expand(p + 1, 1, D), *rotary.cos_sin(shown))  # [p + 1, 1, D]
        scores = (q_shown[:, 0] * k0[:p + 1, 0]).sum(-1)
        logp = probs[0, p, :p + 1].log()
        torch.testing.assert_close(logp - logp[0], (scores - scores[0]) * D ** -0.5, atol=1e-4, rtol=1e-4)
    assert apparent_distances(39, cfg).tolist() == list(range(39, -1, -1))  # inside the chunk size: plain RoPE


def test_a_half_chunk_local_size_keeps_the_nearest_keys_nearer_than_any_folded_one():
    """Local size chunk_size / 2: the successive query is never clamped, so the nearest L keys sit at their true
    distances and every key further back looks at least L away. With the default chunk_size / 16 a key from the
    previous chunk can look nearer than a key that is truly nearer (two needles 16K tokens apart read as equally
    near at 48K: BENCHMARKS.md, retrieval)."""
    half = DCAConfig(chunk_size=40, local_size=20, original_max_position=40, temperature="none")
    for p in range(200):
        shown = apparent_distances(p, half).tolist()
        assert all(shown[k] == p - k for k in range(max(0, p - half.chunk_len + 1), p + 1))
        assert all(shown[k] >= half.chunk_len for k in range(0, max(0, p - half.chunk_len + 1)))
    default = DCAConfig(chunk_size=40, local_size=40 // 16, original_max_position=40, temperature="none")
    shown = apparent_distances(70, default).tolist()  # L = 38: the previous chunk's last key, 33 back, looks 3 back
    assert (shown[37], shown[40]) == (3, 30) and shown[37] < shown[40]


def test_settings_resolution_and_errors(tiny_dir):
    path = tiny_dir("qwen2", num_key_value_heads=2)
    mc = ModelConfig.from_hf_dict(json.load(open(os.path.join(path, "config.json"))))
    assert DCAConfig(enabled=False).resolve(mc) is None
    d = DCAConfig(enabled=True).resolve(mc)
    trained = mc.trained_context_length
    assert (d.chunk_size, d.local_size, d.original_max_position) == (trained, trained // 16, trained)
    assert d.temperature == "position"  # Qwen2.5-1M's recipe, also for a model not made for DCA
    assert DCAConfig(enabled=True, temperature="total").resolve(mc).temperature == "total"
    mc.dual_chunk_attention_config = {"chunk_size": 64, "local_size": 8, "original_max_position_embeddings": 32}
    d = DCAConfig(local_size=4).resolve(mc)
    assert (d.chunk_size, d.local_size, d.original_max_position, d.chunk_len) == (64, 4, 32, 60)
    assert d.temperature == "position"  # a model that declares DCA gets its recipe's temperature
    assert DCAConfig(temperature="none").resolve(mc).temperature == "none"
    with pytest.raises(ConfigError, match="local_size < chunk_size"):
        DCAConfig(enabled=True, chunk_size=8, local_size=8)
    mc.dual_chunk_attention_config = {"chunk_size": 8, "local_size": 8}
    with pytest.raises(ConfigError, match="local_size < chunk_size"):
        DCAConfig(enabled=True).resolve(mc)


def test_engine_with_dca_chunked_prefill_matches_one_pass_and_plain_up_to_chunk_size(dca_model, tiny_dir):
    from megactx.config import EngineConfig
    from megactx.engine.llm_engine import LLMEngine

    def engine(path, **kw):
        return LLMEngine(EngineConfig.from_kwargs(path, dtype="fp32", weight_dtype="fp32", max_model_len=512, **kw))
    ids = token_ids(300, seed=3)
    dca = engine(dca_model)
    assert dca.dca is not None and dca.dca.chunk_len == 40
    whole = engine_logits(dca, ids, chunk=len(ids))
    for chunk in (1, 7, 64):
        torch.testing.assert_close(engine_logits(dca, ids, chunk=chunk), whole, atol=5e-5, rtol=1e-5)
    # up to chunk_size + 1 tokens DCA is the model as trained: equal to the same weights without DCA (the
    # per-position temperature is 1 up to original_max_position_embeddings = 48 tokens; without it, 49)
    plain_path = tiny_dir("qwen2", num_key_value_heads=2)
    plain = engine(plain_path)
    torch.testing.assert_close(engine_logits(dca, ids[:48]), engine_logits(plain, ids[:48]), atol=5e-5, rtol=1e-5)
    no_temp = engine(dca_model, dca_temperature="none")
    torch.testing.assert_close(engine_logits(no_temp, ids[:49]), engine_logits(plain, ids[:49]), atol=5e-5, rtol=1e-5)
    assert not torch.allclose(whole[100:], engine_logits(plain, ids)[100:], atol=1e-3)


def test_generate_beyond_trained_length_needs_dca(tiny_dir):
    from megactx import LLM, SamplingParams
    path = tiny_dir("qwen2", num_key_value_heads=2)
    trained = json.load(open(os.path.join(path, "config.json")))["max_position_embeddings"]
    with pytest.raises(ConfigError, match="--dca"):
        LLM(path, max_model_len=trained * 2)
    llm = LLM(path, max_model_len=trained * 2, dca=True, dca_chunk_size=64, dca_local_size=8)
    out = llm.generate(token_ids(trained + 100, seed=4), SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
    LLM(path, max_model_len=trained * 2, allow_long_context=True)  # the ablation switch


@pytest.mark.parametrize("row", [149, 75, 30])
def test_attention_probe_gives_the_reference_probabilities(row):
    """The probe's row over every key: the softmax the reference writes out (three parts, temperature)."""
    from megactx.attention.attention_probe import AttentionProbe
    cfg = DCAConfig(chunk_size=40, local_size=8, original_max_position=20, temperature="position")
    rotary = _rotary()
    q, k, v = _qkv(150)
    q_scale = temperature_scale(torch.arange(150), torch.full((150,), 150), cfg)
    _, probs = reference_dual_chunk_attention(q, k, v, rotary, cfg, D ** -0.5, q_scale, return_probs=True)
    probe = AttentionProbe(positions=[3, 4, 5], row=row, keep_probs=True)
    _run_backend(q, k, v, cfg, rotary, [64, 50, 36], probe)
    torch.testing.assert_close(probe.probs[0], probs[:, row, :row + 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probe.mass[0], probs[:, row, 3:6].sum(-1), atol=1e-5, rtol=1e-4)
