"""The int8 KV cache: quantization against its definition, and the engine with int8 keys and values close to fp32
through every attention path (dense, DCA, sparse prefill's kernels, decode) and through the prefix cache on disk."""
import pytest
import torch

from megactx import LLM, SamplingParams
from megactx.attention.kv_quant import GROUP, dequantize, quantize
from megactx.engine.kv_cache import block_hash
from helpers import engine_logits, make_engine, token_ids


def test_quantize_matches_the_definition():
    x = torch.randn(3, 50, 64) * torch.logspace(-3, 2, 50)[None, :, None]  # head vectors of very different sizes
    x[0, 0] = 0  # an all-zero vector stays zero
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 50, 64 // GROUP) and int(q.abs().max()) <= 127
    want = x.unflatten(-1, (64 // GROUP, GROUP)).abs().amax(-1) / 127  # one scale per GROUP values
    assert torch.allclose(scale.float(), want.clamp_min(1e-7), rtol=1e-3, atol=1e-7)
    err = (dequantize(q, scale, torch.float32) - x).abs()
    step = scale.float().repeat_interleave(GROUP, -1)
    assert bool((err <= step * 0.5 * 1.002 + 1e-7).all())  # rounding: half a step at most
    assert bool((dequantize(q, scale, torch.float32)[0, 0] == 0).all())


@pytest.mark.parametrize("settings", [{"dca": False}, {}, {"sparse": True, "sparse_threshold": 0,
                                                          "sparse_block_size": 16}])
def test_int8_cache_stays_close_to_fp32(dca_model, settings):
    """In range (plain attention), under DCA (chunk 48), and with sparse prefill inside DCA."""
    ids = token_ids(200 if settings.get("dca", True) else 48, seed=7)
    kw = {"max_model_len": 256, "dca": True, **settings}
    if not kw["dca"]:
        kw["max_model_len"] = 48
    ref = engine_logits(make_engine(dca_model, chunk=32, **kw), ids)
    got = engine_logits(make_engine(dca_model, chunk=32, kv_cache_dtype="int8", **kw), ids)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_int8_cache_takes_about_half_of_bf16(dca_model):
    int8 = make_engine(dca_model, kv_cache_dtype="int8", kv_cache_memory=2**20, block_size=16, max_model_len=48)
    bf16 = make_engine(dca_model, kv_cache_dtype="bf16", kv_cache_memory=2**20, block_size=16, max_model_len=48)
    d = int8.model_config.head_dim  # d int8 values and d / GROUP fp16 scales: (d + 2 d / GROUP) / 2d bytes of bf16
    per_token = d + 2 * d // GROUP
    assert int8.allocator.num_blocks == 2**20 // (int8.model_config.kv_bytes_per_token(1, 2 * d // GROUP) * 16)
    assert int8.allocator.num_blocks / bf16.allocator.num_blocks == pytest.approx(2 * d / per_token, rel=0.02)


def test_int8_blocks_on_disk_are_reused_exactly(dca_model, tmp_path):
    """The int8 values and their scales come back from disk bit for bit; the answer stays the same (its logprobs
    move within int8's rounding: the first run attended to each chunk's own keys before quantizing them)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    doc, question = token_ids(170, seed=11), token_ids(20, seed=12)
    kw = dict(block_size=16, max_num_batched_tokens=64, max_model_len=512, dca=True, kv_cache_dtype="int8",
              dtype="fp32")
    llm = LLM(dca_model, kv_cache_dir=str(tmp_path), **kw)
    first = llm.generate(doc + question, params)[0]
    second = LLM(dca_model, kv_cache_dir=str(tmp_path), **kw)
    again = second.generate(doc + question, params)[0]
    assert second.engine.stats["blocks_read"] == 11 and again.usage.cached_tokens == 176
    a, b = llm.engine.allocator.cached, second.engine.allocator.cached
    names, parent = [], llm.engine.allocator.salt
    for i in range(11):  # the blocks read: their names chain over the tokens (kv_cache.block_hash)
        parent = block_hash(parent, (doc + question)[i * 16:(i + 1) * 16])
        names.append(parent)
    for name in names:
        x, y = llm.engine.runner.export_block(a[name]), second.engine.runner.export_block(b[name])
        assert sorted(x) == ["k", "k_scale", "v", "v_scale"] and x["k"].dtype == torch.int8
        assert all(torch.equal(x[key], y[key]) for key in x)
    assert again.token_ids == first.token_ids
    for x, y in zip(again.outputs[0].logprobs, first.outputs[0].logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=5e-3)
