"""Context parallelism over torch.distributed (gloo, 2 processes of 1 thread): a prompt's tokens and KV cache
split by position give the logits and greedy tokens of one process, with and without DCA, for Llama and Qwen2
checkpoints and SmolLM2; each rank's cache holds only its stripes; what is not split yet is refused by name."""
import pytest
import torch

from megactx.attention.context_parallel import ContextParallel, stripe_size
from megactx.config import EngineConfig
from megactx.engine.llm_engine import LLMEngine
from megactx.errors import ConfigError
from helpers import engine_logits, greedy, token_ids

DCA = {"dca": True, "dca_chunk_size": 96, "dca_local_size": 16, "max_model_len": 400}


def engine(path: str, cp: int, **kw) -> LLMEngine:
    kw = {"sparse": False, "max_num_batched_tokens": 64, "block_size": 16, **kw}
    return LLMEngine(EngineConfig.from_kwargs(path, dtype="fp32", weight_dtype="fp32", num_threads=1,
                                              context_parallel_size=cp, **kw))


def test_positions_are_owned_in_stripes_that_split_every_chunk():
    assert stripe_size(4096, 2, 128) == 2048 and stripe_size(100, 3, 16) == 48
    r0, r1 = ContextParallel(2, 0, 32), ContextParallel(2, 1, 32)
    assert r0.owners(torch.arange(0, 130, 32)).tolist() == [0, 1, 0, 1, 0]
    assert r0.own_spans(10, 150) == [(10, 32), (64, 96), (128, 150)]
    assert r1.own_spans(10, 150) == [(32, 64), (96, 128)]
    assert r1.own_spans(0, 20) == []


@pytest.mark.parametrize("arch,settings", [("llama", {}), ("qwen2", {}), ("qwen2", DCA),
                                           ("qwen2", {**DCA, "max_num_batched_tokens": 50})])
def test_two_ranks_give_the_logits_and_tokens_of_one_process(tiny_dir, arch, settings):
    path = tiny_dir(arch, tie=arch == "llama")
    ids = token_ids(300 if settings else 150, seed=3)
    one = engine(path, 1, **settings)
    want, want_tokens = engine_logits(one, ids), greedy(one, ids)
    two = engine(path, 2, **settings)
    try:
        got = engine_logits(two, ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert greedy(two, ids) == want_tokens  # decode rows too: each computed by its position's owner
        assert two.runner.local.cp.stats["calls"] > 0
    finally:
        two.close()


def test_smollm2_two_ranks_answer_like_one(smollm2_path):
    ids = token_ids(200, seed=5, high=40000)
    one = engine(smollm2_path, 1)
    want = greedy(one, ids)
    two = engine(smollm2_path, 2)
    try:
        assert greedy(two, ids) == want
    finally:
        two.close()


def test_each_rank_writes_only_its_stripes(tiny_dir):
    two = engine(tiny_dir("qwen2"), 2)
    try:
        cache = two.runner.local.backend.cache
        for t in cache.k + cache.v:
            t.fill_(float("nan"))  # rank 0's own stripes are overwritten by the prompt; rank 1's stay NaN here
        ids = token_ids(128, seed=6)
        logits = engine_logits(two, ids)
        assert torch.isfinite(logits).all()
        seq_slots = cache.k[0][0, :128, 0]  # one sequence in consecutive blocks from slot 0
        written = ~torch.isnan(seq_slots)
        owners = ContextParallel(2, 0, 32).owners(torch.arange(128))
        assert written.tolist() == (owners == 0).tolist()
    finally:
        two.close()


def test_what_is_not_split_yet_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match="--no-sparse"):
        engine(tiny_dir("qwen2"), 2, sparse=True)
    with pytest.raises(ConfigError, match="choose one of them"):
        engine(tiny_dir("qwen2"), 2, tensor_parallel_size=2)
