"""Prefix caching: a request served from cached blocks gives the tokens and logprobs of the same request computed
from scratch, computes only its own tokens, shares blocks with concurrent requests, and survives eviction and
preemption. With and without DCA, with sparse prefill, for prefixes ending mid-block, mid DCA chunk and at a DCA
chunk boundary."""
import json

import pytest

from megactx import LLM, SamplingParams
from megactx.engine.kv_cache import BlockAllocator
from megactx.engine.sequence import Sequence
from helpers import token_ids

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def qwen_path(tiny_dir):
    return tiny_dir("qwen2", num_key_value_heads=2)


@pytest.fixture(scope="module")
def dca_path(dca_model):
    """DCA with chunk length 40: 16-token blocks end inside DCA chunks and, at 80, on a boundary."""
    return dca_model


def _same(a, b):
    assert a.token_ids == b.token_ids
    for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=2e-4)


def _engine(path, caching=True, **kw):
    kw.setdefault("max_model_len", 512)
    kw.setdefault("dtype", "fp32")
    return LLM(path, block_size=16, max_num_batched_tokens=64, prefix_caching=caching, **kw)


@pytest.mark.parametrize("model,shared", [("qwen", 77), ("dca", 77), ("dca", 80), ("dca", 125), ("dca", 160)])
def test_second_request_reuses_the_prefix_and_equals_a_fresh_computation(qwen_path, dca_path, model, shared):
    """shared: tokens the two prompts have in common (77: mid-block, inside the second DCA chunk; 80: a DCA chunk
    boundary and a block boundary; 125, 160: deeper chunks)."""
    path = qwen_path if model == "qwen" else dca_path
    doc = token_ids(shared, seed=1)
    first, second = doc + token_ids(30, seed=2), doc + token_ids(23, seed=3)
    llm = _engine(path)
    llm.generate(first, PARAMS)
    computed = llm.engine.stats["prompt_tokens_computed"]
    out = llm.generate(second, PARAMS)[0]
    reused = (shared // 16) * 16  # full blocks of the common part
    assert out.usage.cached_tokens == reused
    assert llm.engine.stats["prompt_tokens_cached"] == reused
    assert llm.engine.stats["prompt_tokens_computed"] - computed == len(second) - reused  # only its own tokens
    _same(out, _engine(path, caching=False).generate(second, PARAMS)[0])


def test_the_same_prompt_twice_recomputes_only_its_last_block(qwen_path):
    prompt = token_ids(96, seed=4)  # six full blocks: the last token must still be computed for its logits
    llm = _engine(qwen_path)
    a = llm.generate(prompt, PARAMS)[0]
    b = llm.generate(prompt, PARAMS)[0]
    assert (a.usage.cached_tokens, b.usage.cached_tokens) == (0, 80)
    _same(a, b)


def test_generated_tokens_are_cached_for_a_follow_up(qwen_path):
    """A conversation's next turn starts with the previous prompt and answer: their full blocks are reused."""
    prompt = token_ids(50, seed=5)
    llm = _engine(qwen_path)
    answer = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    follow = prompt + answer.outputs[0].token_ids + token_ids(10, seed=6)
    out = llm.generate(follow, PARAMS)[0]
    assert out.usage.cached_tokens == 64  # 80 tokens computed before: 5 full blocks, of which 64 lie in `follow`
    _same(out, _engine(qwen_path, caching=False).generate(follow, PARAMS)[0])


def test_sparse_prefill_of_the_rest_plans_against_the_cached_keys(dca_path, tmp_path):
    """Sparse prefill above its threshold (0) with budgets that keep every key: the new part's plans cover the cached
    keys too, so the result equals dense DCA computed from scratch."""
    from megactx.attention.sparse.probe import SparseProbe
    budgets = tmp_path / "sparse.json"
    heads = {str(h): ["vertical_and_slash", 4096, 4096, 0.9] for h in range(4)}
    budgets.write_text(json.dumps([heads, heads]))
    sparse = dict(sparse_threshold=0, sparse_dense_tail=0, sparse_config=str(budgets), sparse_block_size=16,
                  sparse_max_density=1.0)
    doc = token_ids(150, seed=7)
    llm = _engine(dca_path, **sparse)
    llm.generate(doc + token_ids(20, seed=8), PARAMS)
    probe = SparseProbe(record_plans=True)
    llm.engine.observe_sparse(probe)
    second = doc + token_ids(40, seed=9)
    out = llm.generate(second, PARAMS)[0]
    assert out.usage.cached_tokens == 144
    assert probe.calls and min(c.q_start for c in probe.calls) == 144  # only the new rows were prefilled
    first_call = [c for c in probe.calls if c.q_start == 144][0]
    assert any(lo < 144 for head in first_call.plan for block in head for lo, _ in block.ranges)
    _same(out, _engine(dca_path, caching=False, sparse=False).generate(second, PARAMS)[0])


def test_concurrent_requests_share_the_prefix_blocks(qwen_path):
    doc = token_ids(128, seed=10)
    llm = _engine(qwen_path)
    llm.generate(doc + [5], SamplingParams(max_tokens=1))  # the document's 8 blocks are now cached
    prompts = [doc + token_ids(9, seed=20 + i) for i in range(4)]
    engine = llm.engine
    ids = [engine.add_request(p, PARAMS) for p in prompts]
    engine.step()  # all four admitted in one step
    tables = [engine.requests[r].seqs[0].block_table for r in ids]
    assert all(t[:8] == tables[0][:8] for t in tables)  # one copy of the prefix, four holders
    assert all(engine.allocator.refs[b] == 4 for b in tables[0][:8])
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    fresh = _engine(qwen_path, caching=False)
    for rid, p in zip(ids, prompts):
        assert outs[rid].usage.cached_tokens == 128
        _same(outs[rid], fresh.generate(p, PARAMS)[0])


def test_questions_arriving_together_compute_their_document_once(qwen_path):
    """Nothing cached yet: the first question computes the document, the others wait for its blocks instead of
    computing them again, then share them."""
    doc = token_ids(200, seed=30)
    prompts = [doc + token_ids(7, seed=31 + i) for i in range(4)]
    llm = _engine(qwen_path)
    outs = llm.generate(prompts, PARAMS)
    assert [o.usage.cached_tokens for o in outs] == [0, 192, 192, 192]
    assert llm.engine.stats["prompt_tokens_computed"] == sum(map(len, prompts)) - 3 * 192
    fresh = _engine(qwen_path, caching=False)
    for o, p in zip(outs, prompts):
        _same(o, fresh.generate(p, PARAMS)[0])


def test_eviction_and_preemption_keep_the_results(qwen_path):
    """A cache too small for every prompt: least recently used blocks are evicted, sequences are preempted and
    readmitted from what is still cached; every output equals a roomy engine's."""
    prompts = [token_ids(60, seed=30 + i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    roomy = LLM(qwen_path, dtype="fp32", prefix_caching=False).generate(prompts, params)
    bytes_per_token = 2 * 2 * 2 * 8 * 4  # layers x (k, v) x KV heads x head_dim x fp32
    tight = LLM(qwen_path, dtype="fp32", block_size=16, max_model_len=128, kv_cache_memory=128 * 2 * bytes_per_token)
    outs = tight.generate(prompts, params)
    assert tight.engine.stats["preemptions"] > 0
    for a, b in zip(roomy, outs):
        _same(a, b)
    again = tight.generate(prompts[-1], params)[0]  # the most recently used blocks survived the evictions
    assert again.usage.cached_tokens == 48
    _same(again, roomy[-1])


def test_allocator_names_full_blocks_and_evicts_least_recent_first():
    alloc = BlockAllocator(num_blocks=6, block_size=4, caching=True, salt=b"s")
    a = Sequence("a", 0, list(range(9)), SamplingParams())
    alloc.allocate(a, 9)
    a.num_computed_tokens = 9
    new = alloc.register(a)
    assert [b for b, _ in new] == a.block_table[:2]  # two full blocks named, the partial third not
    alloc.release(a)
    assert alloc.num_free == 6 and len(alloc.evictable) == 2
    b = Sequence("b", 0, list(range(8)) + [99], SamplingParams())
    assert alloc.match_prefix(b) == 8 and b.block_table == a_blocks(new)
    alloc.release(b)
    c = Sequence("c", 0, [7] * 20, SamplingParams())  # needs 5 blocks: 4 free, then the least recent named one
    alloc.allocate(c, 20)
    assert len(alloc.evictable) == 1 and len(alloc.cached) == 1
    other_salt = BlockAllocator(num_blocks=6, block_size=4, caching=True, salt=b"t")
    same_tokens = [Sequence(x, 0, list(range(9)), SamplingParams()) for x in "de"]
    assert other_salt.hashes(same_tokens[0], 2) != alloc.hashes(same_tokens[1], 2)  # other settings: other names


def a_blocks(new):
    return [b for b, _ in new]
