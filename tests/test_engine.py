"""The engine's token model: chunked prefill, batching, preemption and the KV cache give the same results
as one sequence computed in one pass."""
import pytest
import torch

from megactx import LLM, SamplingParams
from megactx.engine.kv_cache import BlockAllocator
from megactx.engine.sequence import Sequence
from helpers import engine_logits, make_engine, token_ids


@pytest.fixture(scope="module")
def qwen_path(tiny_dir):
    return tiny_dir("qwen2", num_key_value_heads=2)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_pass(qwen_path, chunk):
    ids = token_ids(150, seed=3)
    engine = make_engine(qwen_path, block_size=16)
    whole = engine_logits(engine, ids, chunk=len(ids))
    torch.testing.assert_close(engine_logits(engine, ids, chunk=chunk), whole, atol=2e-5, rtol=1e-5)


def test_batch_of_different_lengths_equals_each_alone(qwen_path):
    prompts = [token_ids(n, seed=n) for n in (5, 37, 120, 64)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    alone = [LLM(qwen_path, dtype="fp32", max_num_batched_tokens=4096).generate([p], params)[0] for p in prompts]
    # a small step budget forces mixed steps: decodes of short prompts beside prefill chunks of long ones
    together = LLM(qwen_path, dtype="fp32", max_num_batched_tokens=48).generate(prompts, params)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_seeded_sampling_does_not_depend_on_the_batch(qwen_path):
    """A seeded request draws from its own generator: alone, or batched beside other (seeded and unseeded)
    requests, it samples the same tokens."""
    prompt = token_ids(40, seed=7)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=1234)
    llm = LLM(qwen_path, dtype="fp32", max_num_batched_tokens=64)
    alone = llm.generate([prompt], params)[0].token_ids
    others = [token_ids(n, seed=n) for n in (9, 70, 33)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate([others[0], prompt, others[1], prompt, others[2]],
                         [unseeded, params, SamplingParams(temperature=0.7, max_tokens=16, ignore_eos=True, seed=5),
                          params, unseeded])
    assert batch[1].token_ids == alone and batch[3].token_ids == alone
    assert llm.generate([prompt], unseeded)[0].token_ids != alone  # the draw is random without the seed: the test can tell


def test_preemption_recomputes_and_gives_the_same_output(qwen_path):
    prompts = [token_ids(60, seed=10 + i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(qwen_path, dtype="fp32").generate(prompts, params)
    # 8 blocks of 16 tokens = 128 slots: 4 sequences of 100 tokens cannot all stay resident
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv_heads x head_dim x fp32
    tight = LLM(qwen_path, dtype="fp32", block_size=16, max_model_len=128, kv_cache_memory=128 * bytes_per_token)
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.engine.allocator.num_free == tight.engine.allocator.num_blocks  # everything released


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp16"])
def test_half_precision_kv_cache_stays_close(qwen_path, kv_dtype):
    ids = token_ids(80, seed=4)
    ref = engine_logits(make_engine(qwen_path), ids, chunk=16)
    got = engine_logits(make_engine(qwen_path, kv_cache_dtype=kv_dtype), ids, chunk=16)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_kv_dtype_auto_halves_the_cache_only_when_fp32_would_not_fit(qwen_path, monkeypatch, caplog):
    """auto: the compute dtype, unless one max_model_len sequence's fp32 keys and values would take more than half
    the available memory (a million tokens on a 24 GB machine): then bf16, with a warning that says why."""
    from megactx.config import EngineConfig
    from megactx.engine import kv_sizing, llm_engine

    def engine(max_model_len, **kw):
        return llm_engine.LLMEngine(EngineConfig.from_kwargs(qwen_path, dtype="fp32", max_model_len=max_model_len, **kw))
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32 bytes of the tiny model
    monkeypatch.setattr(kv_sizing, "available_memory", lambda: 2 * per_token * 256 + 1)
    caplog.set_level("WARNING", logger="megactx")
    assert engine(256).runner.kv_dtype == torch.float32 and not caplog.records
    assert engine(512).runner.kv_dtype == torch.bfloat16 and "bf16" in caplog.records[0].getMessage()
    assert engine(512, kv_cache_dtype="fp32").runner.kv_dtype == torch.float32


def test_allocator_keeps_a_sequence_contiguous_and_frees_everything():
    alloc = BlockAllocator(num_blocks=32, block_size=4)
    a, b = Sequence("a", 0, [1] * 9, SamplingParams()), Sequence("b", 0, [1] * 9, SamplingParams())
    alloc.allocate(a, 9)
    alloc.allocate(b, 9)
    for _ in range(3):  # a grows by 4 tokens at a time, interleaved with b
        a.num_computed_tokens += 4
        alloc.allocate(a, 4)
    assert a.block_table == list(range(a.block_table[0], a.block_table[0] + len(a.block_table)))
    assert not set(a.block_table) & set(b.block_table)
    alloc.release(a)
    alloc.release(b)
    assert alloc.num_free == 32 and alloc.free == list(range(32))


def test_packed_weights_batch_decode_gives_the_same_tokens(qwen_path):
    from megactx.layers.linear import packing_available
    prompts = [token_ids(n, seed=20 + n) for n in (9, 17, 30, 4, 12, 25, 6, 40)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    plain = LLM(qwen_path, dtype="fp32", packed_weights="off").generate(prompts, params)
    llm = LLM(qwen_path, dtype="fp32", packed_weights="on")
    layers = llm.engine.runner.model.linear_layers()
    assert all(m.packed is not None for m in layers) == packing_available(torch.device("cpu"))
    packed = llm.generate(prompts, params)
    for a, b in zip(plain, packed):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    single = LLM(qwen_path, dtype="fp32", max_num_seqs=1).engine.runner.model.linear_layers()
    assert all(m.packed is None for m in single)  # auto: one sequence at a time never batches


@pytest.mark.parametrize("native", [False, True])
def test_engine_warns_when_the_cpu_has_no_native_bf16(qwen_path, monkeypatch, caplog, native):
    # the warning follows what the CPU reports, not this machine: both answers are simulated
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="megactx.engine.model_runner"):
        LLM(qwen_path, dtype="bf16", max_num_batched_tokens=64)
        LLM(qwen_path, dtype="fp32", max_num_batched_tokens=64)
    warnings = [r.getMessage() for r in caplog.records if "native" in r.getMessage()]
    if native:
        assert warnings == []
    else:  # one warning, for the bf16 engine only, naming the setting and its fix
        assert len(warnings) == 1 and "--dtype bf16" in warnings[0] and "--dtype fp32" in warnings[0]


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, True, torch.bfloat16), (False, True, torch.float32),
                                                    (False, False, torch.float32)])
def test_dtype_auto_follows_the_cpu_and_says_why(qwen_path, monkeypatch, caplog, amx, avx512_bf16, want):
    # the CPU's answers are simulated: bf16 only where AMX makes it several times faster
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    with caplog.at_level("INFO", logger="megactx.engine.llm_engine"):
        llm = LLM(qwen_path, max_num_batched_tokens=64)
    assert llm.engine.runner.dtype == want
    said = [r.getMessage() for r in caplog.records if "Compute dtype auto" in r.getMessage()]
    assert len(said) == 1 and ("AMX" in said[0]) and (("bf16," if amx else "fp32,") in said[0])
    assert LLM(qwen_path, dtype="fp32", max_num_batched_tokens=64).engine.runner.dtype == torch.float32


def test_prefill_progress_gives_rate_and_time_left(qwen_path):
    """prefill_rate from the engine's outputs: tokens per second after the first step and the time left, None
    before a second step and after the prompt is done."""
    from megactx.outputs import prefill_rate
    llm = LLM(qwen_path, dtype="fp32", max_num_batched_tokens=16)
    seen = []

    def step(outputs):
        out = outputs[0]
        seen.append((out.metrics["prefill_done"], prefill_rate(out, now=out.metrics["prefill_mark"][0] + 2.0)))
    llm.generate(token_ids(80, seed=1), SamplingParams(temperature=0, max_tokens=2), on_step=step)
    assert [d for d, _ in seen[:5]] == [16, 32, 48, 64, 80]
    assert seen[0][1] is None and seen[4][1] is None  # one step: no rate yet; done: nothing left
    for i, (done, (rate, left)) in enumerate(seen[1:4], start=1):  # 2 s after the first step (simulated clock)
        assert rate == pytest.approx((done - 16) / 2.0) and left == pytest.approx((80 - done) / rate)
