"""Context parallelism over torch.distributed (gloo, 2 processes of 1 thread): a prompt's tokens and KV cache
split by position give the logits and greedy tokens of one process, with and without DCA, for Llama and Qwen2
checkpoints and SmolLM2, and with sparse prefill the plans and logits of one process; each rank's cache holds only
its stripes; what is not split is refused by name."""
import pytest
import torch

from megactx.attention.context_parallel import ContextParallel, stripe_size
from megactx.attention.sparse.probe import SparseProbe
from megactx.config import EngineConfig
from megactx.engine.llm_engine import LLMEngine
from megactx.errors import ConfigError
from helpers import engine_logits, greedy, token_ids

DCA = {"dca": True, "dca_chunk_size": 96, "dca_local_size": 16, "max_model_len": 400}
# every row sparse, at a cut-off that leaves keys out; 128-token chunks: 64-token stripes, one pooled group each
SPARSE = {"sparse": True, "sparse_threshold": 0, "sparse_estimate": "pooled", "sparse_mass": 0.3,
          "sparse_block_size": 32, "sparse_dense_tail": 0, "sparse_max_density": 1.0, "max_num_batched_tokens": 128}


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
    # a sparse plan's ranges cut to a rank's stripes: exactly the positions it holds, in order
    bounds = torch.tensor([[0, 200], [40, 70], [90, 95], [5, 6]])
    for r in (r0, r1):
        parts, entry = r.clip(bounds, torch.arange(4))
        for e, (lo, hi) in enumerate(bounds.tolist()):
            got = [p for (a, b), k in zip(parts.tolist(), entry.tolist()) if k == e for p in range(a, b)]
            assert got == [p for p in range(lo, hi) if (p // 32) % 2 == r.rank]

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


@pytest.mark.parametrize("settings,length", [
    (SPARSE, 400), ({**SPARSE, **DCA}, 400),
    ({**SPARSE, **DCA, "dca_chunk_size": 512, "dca_local_size": 32, "max_model_len": 1400, "sparse_coarse_refine": 1,
      "max_num_batched_tokens": 256, "sparse_max_keys": 256}, 1300)])
def test_sparse_prefill_over_two_ranks_plans_and_computes_as_one_process(tiny_dir, settings, length):
    """The ranks share their key groups' means, so each plans what one process plans and computes the planned keys
    it holds: the logits of one process's sparse prefill, which differ from dense attention's."""
    path = tiny_dir("qwen2")
    ids = token_ids(length, seed=4)
    dense = engine_logits(engine(path, 1, **{**settings, "sparse": False}), ids)
    one = engine(path, 1, **settings)
    probe = SparseProbe()
    one.observe_sparse(probe)
    want = engine_logits(one, ids)
    assert probe.calls and min(c.density for c in probe.calls) < 0.8
    assert (want - dense).abs().max() > 1e-3  # the plans leave keys out that matter
    two = engine(path, 2, **settings)
    try:
        probe_two = SparseProbe()
        two.observe_sparse(probe_two)
        got = engine_logits(two, ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert [c.density for c in probe_two.calls] == pytest.approx([c.density for c in probe.calls])
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


@pytest.mark.parametrize("settings", [{}, {**SPARSE, "max_num_batched_tokens": 64, "sparse_block_size": 16}])
def test_each_rank_writes_only_its_stripes(tiny_dir, settings):
    two = engine(tiny_dir("qwen2"), 2, **settings)
    try:
        cache = two.runner.local.backend.cache
        for t in cache.k + cache.v:
            t.fill_(float("nan"))  # rank 0's own stripes are overwritten by the prompt; rank 1's stay NaN here
        ids = token_ids(128, seed=6)
        logits = engine_logits(two, ids)
        assert torch.isfinite(logits).all()
        seq_slots = cache.k[0][0, :128, 0]  # one sequence in consecutive blocks from slot 0
        written = ~torch.isnan(seq_slots)
        owners = two.runner.local.cp.owners(torch.arange(128))  # stripes of 32, of 64 with sparse prefill
        assert written.tolist() == (owners == 0).tolist()
    finally:
        two.close()


def test_what_is_not_split_yet_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match="--sparse-estimate pooled"):
        engine(tiny_dir("qwen2"), 2, sparse=True, sparse_estimate="vertical-slash")
    with pytest.raises(ConfigError, match="choose one of them"):
        engine(tiny_dir("qwen2"), 2, tensor_parallel_size=2)
