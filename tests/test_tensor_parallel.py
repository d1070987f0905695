"""Tensor parallelism over torch.distributed (gloo, 2 processes of 1 thread): the sharded model gives the logits
and greedy tokens of one process, for Llama and Qwen2 checkpoints, with and without DCA; settings that cannot be
split are refused by name."""
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from megactx.attention.sparse.probe import SparseProbe
from megactx.config import EngineConfig
from megactx.engine.llm_engine import LLMEngine
from megactx.errors import ConfigError
from conftest import GGUF_VOCAB, write_gguf
from helpers import engine_logits, greedy, token_ids


def engine(path: str, tp: int, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(path, dtype="fp32", weight_dtype="fp32", num_threads=1,
                                              max_num_batched_tokens=64, tensor_parallel_size=tp, **kw))


SPARSE = {"sparse_threshold": 0, "sparse_mass": 0.5, "sparse_block_size": 16, "sparse_dense_tail": 0,
          "sparse_max_density": 1.0}


@pytest.mark.parametrize("arch,settings", [("llama", {}), ("qwen2", {}),
                                           ("qwen2", {"dca": True, "dca_chunk_size": 96, "dca_local_size": 16,
                                                      "max_model_len": 400}),
                                           # each rank plans its own heads: the plans, and so the result, of one
                                           # process
                                           ("qwen2", {"dca": True, "dca_chunk_size": 96, "dca_local_size": 16,
                                                      "max_model_len": 400, **SPARSE})])
def test_two_ranks_give_the_logits_and_tokens_of_one_process(tiny_dir, arch, settings):
    path = tiny_dir(arch, tie=arch == "llama")
    ids = token_ids(300 if settings else 150, seed=3)
    one = engine(path, 1, **settings)
    probe = SparseProbe()
    one.observe_sparse(probe)
    want, want_tokens = engine_logits(one, ids), greedy(one, ids)
    if "sparse_threshold" in settings:
        assert probe.calls and min(c.density for c in probe.calls) < 0.9  # really sparse
    two = engine(path, 2, **settings)
    try:
        assert two.runner.local.model.model.layers[0].self_attn.num_heads == 2  # half of the 4 heads here
        got = engine_logits(two, ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert greedy(two, ids) == want_tokens
    finally:
        two.close()


def test_a_gguf_file_loads_shard_by_shard(tiny_dir, tmp_path):
    path = write_gguf(str(tmp_path / "tiny-qwen2.gguf"), tiny_dir("qwen2", vocab_size=GGUF_VOCAB), "qwen2", Q.Q8_0)
    ids = token_ids(100, seed=4, high=GGUF_VOCAB)
    want = engine_logits(engine(path, 1), ids)
    two = engine(path, 2)
    try:
        torch.testing.assert_close(engine_logits(two, ids), want, atol=1e-4, rtol=1e-4)
    finally:
        two.close()


def test_a_model_whose_heads_do_not_split_is_refused(smollm2_path):
    with pytest.raises(ConfigError, match=r"attention heads \(9\).*--tensor-parallel-size 2"):
        engine(smollm2_path, 2)


def test_a_killed_rank_ends_the_engine_with_an_error_not_a_hang(tiny_dir):
    import time

    from megactx.engine.distributed import DistributedError
    two = engine(tiny_dir("qwen2"), 2, dist_timeout=20)
    try:
        two.workers[0].kill()
        two.workers[0].join(10)
        start = time.monotonic()
        with pytest.raises(DistributedError, match="megactx-rank1 exited"):
            engine_logits(two, token_ids(50))
        assert time.monotonic() - start < 60
    finally:
        two.close()
