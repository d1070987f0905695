"""Prompt logprobs (lm-eval's loglikelihood): every prompt token's logprob, rank and top k equal transformers'
log-softmax over the same prompt, computed chunk by chunk; max_tokens 0 scores the prompt and generates nothing;
the prefix cache never hides a token from scoring."""
import pytest
import torch

from megactx import LLM, SamplingParams
from conftest import hf_forward
from helpers import token_ids


@pytest.mark.parametrize("chunk", [7, 64])
def test_prompt_logprobs_equal_transformers(tiny_dir, chunk):
    path = tiny_dir("qwen2", num_key_value_heads=2)
    ids = token_ids(50, seed=5)
    want = torch.log_softmax(hf_forward(path, ids), -1)  # [T, V]: row p predicts token p + 1
    llm = LLM(path, dtype="fp32", weight_dtype="fp32", max_num_batched_tokens=chunk, block_size=16)
    out = llm.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=3))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.usage.completion_tokens == 0
    got = out.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        e, row = got[p], want[p - 1]
        assert e.token_id == ids[p] and e.logprob == pytest.approx(float(row[ids[p]]), abs=1e-4)
        # rank: 1 + the tokens scored higher; a random model's tail holds near-ties that chunked and whole-prompt
        # fp32 sums may order either way, so ties within 1e-5 may count on either side
        x = row[ids[p]]
        assert int((row > x + 1e-5).sum()) + 1 <= e.rank <= int((row > x - 1e-5).sum()) + 1
        assert [i for i, _ in e.top_logprobs] == torch.topk(row, 3).indices.tolist()


def test_prompt_logprobs_with_generation_and_a_cached_prefix(tiny_dir):
    """A request for prompt logprobs computes its whole prompt even when its prefix is cached, and still
    generates; the n choices share the one list."""
    path = tiny_dir("qwen2", num_key_value_heads=2)
    ids = token_ids(40, seed=6)
    llm = LLM(path, dtype="fp32", weight_dtype="fp32", max_num_batched_tokens=16, block_size=16)
    llm.generate(ids, SamplingParams(max_tokens=1))  # caches 2 blocks of the prompt
    out = llm.generate(ids, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0, n=2))[0]
    assert out.usage.cached_tokens == 0 and len(out.prompt_logprobs) == len(ids)
    assert all(len(c.token_ids) == 3 for c in out.outputs)
    want = torch.log_softmax(hf_forward(path, ids), -1)
    assert out.prompt_logprobs[-1].logprob == pytest.approx(float(want[-2, ids[-1]]), abs=1e-4)
    plain = llm.generate(ids, SamplingParams(max_tokens=3, temperature=0))[0]
    assert plain.prompt_logprobs is None and plain.usage.cached_tokens == 32
