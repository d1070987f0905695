"""LLMEngine: requests in, one engine step at a time, RequestOutputs out.

step() is the whole loop: the scheduler picks token counts (integers), the model runner computes them, the
sampler picks the next token of every sequence whose chunk reached its end, and the bookkeeping appends it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from megactx.attention.attention_probe import AttentionProbe
from megactx.attention.context_parallel import ContextParallel, stripe_size
from megactx.attention.sparse.patterns import check_context_parallel, resolve_sparse
from megactx.attention.sparse.pooled import GROUP
from megactx.attention.sparse.probe import SparseProbe
from megactx.config import EngineConfig, ceil_div, log_fmt_bytes
from megactx.config.hardware import resolve_compute_dtype
from megactx.engine.cache_salt import cache_salt
from megactx.engine.detokenizer import IncrementalDetokenizer
from megactx.engine.disk_cache import DiskKVCache
from megactx.engine.distributed import MirroredRunner, serve_steps, start_group
from megactx.engine.guided import Guide
from megactx.engine.kv_cache import BlockAllocator
from megactx.engine.kv_sizing import kv_cache_budget, kv_cache_dtype
from megactx.engine.model_runner import ModelRunner
from megactx.engine.prompt_logprobs import score_prompt_tokens
from megactx.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from megactx.engine.sequence import Sequence
from megactx.errors import ConfigError, RequestError
from megactx.layers.parallel import SINGLE, TensorParallel
from megactx.loader import open_model
from megactx.loader.tokenizer import load_tokenizer
from megactx.outputs import CompletionOutput, RequestOutput, Usage
from megactx.sampling import SampledToken, SamplingParams, sample

logger = logging.getLogger(__name__)
LOGIT_ROWS = 1024  # iter_logits yields at most this many rows of logits at a time


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival: float


def derived_max_len(config) -> int:
    rs = config.rope_scaling or {}
    if config.rope_type in ("default", "llama3") or "factor" not in rs:
        return config.max_position_embeddings
    if "original_max_position_embeddings" in rs:
        return max(config.max_position_embeddings, int(rs["original_max_position_embeddings"] * rs["factor"]))
    return int(config.max_position_embeddings * rs["factor"])


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.source = open_model(config.model)
        self.model_config = mc = self.source.config
        self.tp, self.cp, self.workers = SINGLE, None, []
        par = config.parallel
        if par.tensor_parallel_size > 1:  # before loading: each rank loads only its shard
            for total, what in ((mc.num_attention_heads, "attention heads"), (mc.num_key_value_heads, "KV heads"),
                                (mc.intermediate_size, "intermediate_size")):
                TensorParallel(par.tensor_parallel_size).split(total, what)  # refused before any process starts
        compute, compute_name, why = resolve_compute_dtype(config.dtype, config.device)
        sparse = resolve_sparse(config.sparse, self.source.path, compute_name)
        if par.context_parallel_size > 1 and sparse:
            check_context_parallel(*sparse)  # before any process starts
        if par.world_size > 1:
            self.workers = start_group(config, run_worker)
            if par.tensor_parallel_size > 1:
                self.tp = TensorParallel(par.tensor_parallel_size, par.rank)
            else:  # sparse plans read whole 64-key groups, each held by one rank
                multiple = math.lcm(config.cache.block_size, GROUP) if sparse else config.cache.block_size
                self.cp = ContextParallel(par.context_parallel_size, par.rank,
                                          stripe_size(config.scheduler.max_num_batched_tokens,
                                                      par.context_parallel_size, multiple))
        self.tokenizer = load_tokenizer(config.tokenizer or self.source.path, mc.eos_token_ids)
        sc, cc = config.scheduler, config.cache
        self.dca = config.dca.resolve(mc)
        limit = derived_max_len(mc)
        self.max_model_len = sc.max_model_len or limit
        if self.max_model_len > limit and self.dca is None and not config.dca.allow_long_context:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context length {limit}; enable Dual Chunk "
                f"Attention with --dca to run beyond it without training (or lower --max-model-len; "
                f"--allow-long-context runs plain RoPE anyway, for ablations)")
        if self.dca is not None:
            logger.info("Dual Chunk Attention: %s", self.dca.describe())
        self.compute_dtype = compute_name  # what --dtype auto resolved to, for reports
        if why:
            logger.info("Compute dtype auto: %s, since %s (--dtype fp32 or bf16 chooses)", compute_name, why)
        self.sparse = sparse[0] if sparse else None  # the settings in effect
        if self.sparse is not None and self.max_model_len > self.sparse.threshold:
            logger.info("Sparse prefill: %s", self.sparse.describe())
        dtype = kv_cache_dtype(cc.kv_cache_dtype, compute, mc, self.max_model_len)
        per_token, budget = kv_cache_budget(cc, sc, mc, dtype, self.max_model_len)
        num_blocks = budget // (per_token * cc.block_size)
        logger.info("KV cache: %d blocks of %d tokens (%s, %s)", num_blocks, cc.block_size,
                    log_fmt_bytes(num_blocks * cc.block_size * per_token), dtype)
        self.runner = ModelRunner(self.source, compute_name, config.device, num_blocks, cc.block_size,
                                  str(dtype).removeprefix("torch."), config.weight_dtype, self.dca, sparse,
                                  config.packed_weights, sc.max_num_seqs, self.tp, self.cp)
        if par.world_size > 1 and par.rank == 0:
            self.runner = MirroredRunner(self.runner, self.workers, par.kind)
        self.source.iter_weights = None  # drop the file mapping (a GGUF's pages would stay in RSS)
        settings = {
            "dtype": str(self.runner.dtype), "weights": str(self.runner.weight_dtype), "kv": str(self.runner.kv_dtype),
            "block": cc.block_size, "dca": self.dca.describe() if self.dca else None,
            "sparse": f"{self.sparse.describe()}, dense tail {self.sparse.dense_tail}" if self.sparse else None}
        salt = cache_salt(self.source.path, mc, settings)
        self.allocator = BlockAllocator(num_blocks, cc.block_size, caching=cc.prefix_caching, salt=salt)
        self.disk = None
        if cc.kv_cache_dir is not None:
            shape = (mc.num_hidden_layers, mc.num_key_value_heads, cc.block_size, mc.head_dim)
            try:
                self.disk = DiskKVCache(cc.kv_cache_dir, salt, shape, cc.kv_cache_disk_size,
                                        info={"model": self.source.path, **settings})
            except OSError as e:
                raise ConfigError(f"--kv-cache-dir {cc.kv_cache_dir}: {e.strerror or e}; give a writable "
                                  f"directory") from None
        self.scheduler = Scheduler(sc, self.allocator)
        self.requests: dict[str, Request] = {}
        # (request id, exception) of requests that failed alone (their sampling raised), for the caller to report:
        # AsyncEngine fails their streams, LLM.generate raises
        self.failures: list[tuple[str, Exception]] = []
        self._next_id = 0
        # prompt tokens computed by the model (again after a preemption) vs taken from a cache; blocks moved to
        # and from the disk cache, and the time spent doing it
        self.stats = {"prompt_tokens_computed": 0, "prompt_tokens_cached": 0, "preemptions": 0,
                      "blocks_written": 0, "blocks_read": 0, "disk_seconds": 0.0}

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id or f"req-{self._next_id}"
        self._next_id += 1
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids, params)
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator().manual_seed((params.seed + i) % 2**64)
            guide = Guide(self.tokenizer, params.guided) if params.guided is not None else None
            seqs.append(Sequence(request_id, i, ids, params, generator=gen, arrival=now, guide=guide))
        self.requests[request_id] = Request(request_id, text, ids, seqs,
                                            [IncrementalDetokenizer(self.tokenizer, s) for s in seqs], now)
        for s in seqs:
            self.scheduler.add(s)
        return request_id

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is out of range for a vocabulary of {vocab}")
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"logit_bias token id {bad[0]} is out of range for a vocabulary of {vocab}")
        limit = self.max_model_len
        if len(ids) > limit or (len(ids) == limit and params.max_tokens != 0):
            raise RequestError(f"the prompt has {len(ids)} tokens; this model's maximum context length is "
                               f"{limit} tokens, leaving no room to generate. Shorten the prompt")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise RequestError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                               f"tokens and max_tokens asks for {params.max_tokens} more "
                               f"({len(ids) + params.max_tokens} in all). Shorten the prompt or lower max_tokens")

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        for s in req.seqs if req else []:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")

    def observe_attention(self, probe: AttentionProbe | None) -> None:
        """Record where one row's attention goes (megactx/attention/attention_probe.py), None to stop. The
        retrieval studies' hook; one process only."""
        if probe is not None and self.config.parallel.world_size > 1:
            raise ConfigError("the attention probe observes one process; run without --tensor-parallel-size and "
                              "--context-parallel-size")
        self.runner.backend.attention_probe = probe

    @property
    def sparse_probe(self) -> SparseProbe | None:
        """The probe observe_sparse installed, if any."""
        sparse = self.runner.backend.sparse
        return sparse.probe if sparse is not None else None

    def observe_sparse(self, probe: SparseProbe | None) -> None:
        """Record what sparse prefill does into `probe` (megactx/attention/sparse/probe.py), None to stop: the
        engine's one hook for benchmarks and tests. Off by default; without sparse prefill it records nothing."""
        if self.runner.backend.sparse is not None:
            self.runner.backend.sparse.observe(probe)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def iter_logits(self, token_ids: list[int], chunk_size: int | None = None):
        """Score one token sequence by chunked prefill: yield (start, logits [n, vocab]) slice by slice, so that
        full-length logits are never materialised: each prefill chunk's logits come in slices of at most
        LOGIT_ROWS rows (a 16K-token chunk of a 152K-token vocabulary would be 10 GB at once). Runs alone."""
        if self.scheduler.has_work():
            raise RuntimeError("iter_logits needs an idle engine")
        if len(token_ids) > self.max_model_len:
            raise RequestError(f"{len(token_ids)} tokens exceed max_model_len {self.max_model_len}")
        chunk_size = chunk_size or self.config.scheduler.max_num_batched_tokens
        seq = Sequence("score", 0, list(token_ids), SamplingParams(max_tokens=1))
        try:
            while seq.num_computed_tokens < seq.num_tokens:
                n = min(chunk_size, seq.num_pending_tokens)
                self.allocator.allocate(seq, n)
                hidden, _ = self.runner.forward([ScheduledChunk(seq, n)])
                for a in range(0, n, LOGIT_ROWS):
                    yield seq.num_computed_tokens + a, self.runner.logits(hidden[a:a + LOGIT_ROWS])
                seq.num_computed_tokens += n
        finally:
            self.allocator.release(seq)

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel engine (a one-process engine holds nothing to stop)."""
        if isinstance(self.runner, MirroredRunner):
            self.runner.close()

    # ---- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.disk is not None:
            self.load_from_disk()
        plan = self.scheduler.schedule()
        logits = None
        if plan.chunks:
            hidden, last_rows = self.runner.forward(plan.chunks)
            if any(c.seq.params.prompt_logprobs is not None for c in plan.chunks):
                score_prompt_tokens(plan.chunks, hidden, self.runner.logits, LOGIT_ROWS)
            logits = self.runner.logits(hidden[last_rows])
        done = [c.seq for c in plan.chunks if c.completes]
        tokens = sample(logits, done) if done else []
        return self.update(plan, tokens)

    def update(self, plan: SchedulerOutput, tokens: list[SampledToken]) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        it = iter(tokens)
        self.stats["prompt_tokens_cached"] += plan.cached_tokens
        self.stats["preemptions"] += len(plan.preempted)
        failed: dict[str, Exception] = {}
        for ch in plan.chunks:
            seq = ch.seq
            completes = ch.completes
            start = seq.num_computed_tokens
            self.stats["prompt_tokens_computed"] += max(0, min(start + ch.num_tokens, seq.num_prompt_tokens) - start)
            seq.num_computed_tokens += ch.num_tokens
            if seq.prefill_mark is None:
                seq.prefill_mark = (time.monotonic(), seq.num_computed_tokens)
            new_blocks = self.allocator.register(seq)
            if new_blocks and self.disk is not None and self.disk.writable:
                start = time.perf_counter()
                for block, name in new_blocks:
                    self.disk.write(name, self.runner.export_block(block))
                self.stats["blocks_written"] += len(new_blocks)
                self.stats["disk_seconds"] += time.perf_counter() - start
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            if completes and seq.params.max_tokens == 0:  # the prompt only (its logprobs): nothing to generate
                next(it)
                seq.finish_reason = "length"
                self.scheduler.finish(seq, "length")
            elif completes:
                token = next(it)
                if isinstance(token, Exception):
                    failed[req.request_id] = token
                elif req.request_id not in failed:
                    try:
                        self.append_token(req, seq, token)
                    except RequestError as e:  # the grammar refused the token: that request fails alone
                        failed[req.request_id] = e
        for request_id, error in failed.items():  # that request ends; the others in the step go on
            logger.warning("request %s failed while sampling: %s", request_id, error)
            self.abort(request_id)
            touched.pop(request_id, None)
            self.failures.append((request_id, error))
        outputs = [self.make_output(r) for r in touched.values()]
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def load_from_disk(self) -> None:
        """Bring the prefix blocks of the sequences about to be admitted from disk into free KV blocks, where
        the scheduler's prefix match finds them. Stops where a sequence's chain leaves the cache, and before a
        load would evict a block already claimed or leave too little room to compute the rest."""
        alloc, claimed, start = self.allocator, 0, time.perf_counter()
        admissible = self.config.scheduler.max_num_seqs - len(self.scheduler.running)
        for seq in list(self.scheduler.waiting)[:max(0, admissible)]:
            names = alloc.lookup(seq)
            rest = ceil_div(seq.num_tokens, alloc.block_size) - len(names)
            for name in names:
                if name in alloc.cached:
                    alloc.touch(name)
                elif name in self.disk and alloc.num_free - claimed > rest:
                    block = alloc.add_cached(name)
                    kv = self.disk.read(name) if block is not None else None
                    if kv is None:
                        alloc.forget(name)
                        break
                    self.runner.import_block(block, kv)
                    self.stats["blocks_read"] += 1
                else:
                    break
                claimed += 1
        self.stats["disk_seconds"] += time.perf_counter() - start

    def append_token(self, req: Request, seq: Sequence, token: SampledToken) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.token_ids.append(token.token_id)
        if seq.params.logprobs is not None:
            seq.logprobs.append(token)
        params = seq.params
        tid = token.token_id
        if seq.guide is not None:
            seq.guide.accept(tid)
        if tid in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tid
        elif not params.ignore_eos and tid in self.tokenizer.eos_token_ids:
            seq.finish_reason = "stop"
        else:
            req.detokenizers[seq.index].step(seq)
            if seq.guide is not None and seq.guide.complete:  # the output is whole: end it without an EOS
                seq.finish_reason = "stop"
        if seq.finish_reason is None:
            at_max = params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens
            if at_max or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq, seq.finish_reason)

    def make_output(self, req: Request) -> RequestOutput:
        outs = []
        for s, d in zip(req.seqs, req.detokenizers):
            # token_ids keep a final EOS (as vLLM does); the text never shows it
            outs.append(CompletionOutput(s.index, d.stable_text(s), s.output_token_ids, s.finish_reason, s.stop_reason,
                                         s.logprobs if s.params.logprobs is not None else None))
        finished = all(s.is_finished for s in req.seqs)
        first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        usage = Usage(len(req.prompt_token_ids), sum(s.num_output_tokens for s in req.seqs),
                      sum(s.num_cached_prompt_tokens for s in req.seqs))
        metrics = {"arrival": req.arrival, "first_token_time": min(first) if first else None,
                   "prefill_done": min(min(s.num_computed_tokens, s.num_prompt_tokens) for s in req.seqs),
                   "prefill_mark": req.seqs[0].prefill_mark}
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, usage, metrics,
                             req.seqs[0].prompt_logprobs)


def run_worker(config: EngineConfig) -> None:
    """A tensor-parallel rank above 0 (a process rank 0 started, or one torchrun started): the same engine set-up
    as rank 0's, holding its shard, then every step rank 0 sends until it stops."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"rank {config.parallel.rank} %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(config)
    try:
        serve_steps(engine.runner)
    except Exception as e:  # rank 0 went away: nothing left to compute for
        logger.warning("leaving the tensor-parallel group: %s", e)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
