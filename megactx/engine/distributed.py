"""Tensor-parallel execution on torch.distributed: rank 0 schedules and samples, every rank runs the same step.

Rank 0 is the engine everyone talks to (the server, LLM.generate). Its model runner is a MirroredRunner: each
call that computes (a step's forward, the logits of some rows) is first sent to the other ranks, which make the
same call on their shard (layers/parallel.py), so the collectives inside the model meet. What is sent is plain
data: the step's ChunkInputs (token ids, positions, block tables: the KV cache layout is the same on every rank,
only the heads differ), or the hidden rows whose logits rank 0 wants. The scheduler, the prefix cache and the
sampler exist on rank 0 only.

On one machine, rank 0 starts the other ranks itself (spawned processes with the same EngineConfig and their
rank). Across machines, torchrun starts every rank (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the
environment: with_launcher_rank() reads them) and the ranks meet through its rendezvous. Backend gloo on CPU,
nccl on CUDA. A rank that dies or stops answering makes the next collective fail or
time out (--dist-timeout): the engine then raises DistributedError, which ends the server instead of hanging it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megactx.engine.model_runner import ChunkInput, ModelRunner
from megactx.errors import ConfigError, MegactxError

logger = logging.getLogger(__name__)


class DistributedError(MegactxError):
    """Another rank failed, left or did not answer in time: the engine cannot go on."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def with_launcher_rank(config):
    """The EngineConfig with the rank torchrun gave this process (unchanged outside torchrun); a world size
    other than --tensor-parallel-size is refused."""
    p = config.parallel
    if not launched_by_torchrun() or p.world_size == 1:
        return config
    world = int(os.environ["WORLD_SIZE"])
    if world != p.world_size:
        flag = "--context-parallel-size" if p.context_parallel_size > 1 else "--tensor-parallel-size"
        raise ConfigError(f"torchrun started {world} processes but {flag} is {p.world_size}; give torchrun "
                          f"--nproc-per-node x --nnodes = {flag}")
    return dataclasses.replace(config, parallel=dataclasses.replace(
        config.parallel, rank=int(os.environ["RANK"]), dist_host=os.environ["MASTER_ADDR"],
        dist_port=int(os.environ["MASTER_PORT"])))


def start_group(config, worker_main) -> list:
    """Join (rank > 0) or form (rank 0: after starting the others on this machine, each running
    worker_main(its config)) the group of config.parallel.world_size processes. -> on rank 0, the processes it
    started. config: the EngineConfig."""
    p = config.parallel
    workers = []
    if p.rank == 0 and p.dist_port == 0 and not launched_by_torchrun():  # one machine: the other ranks are ours to start
        port = _free_port(p.dist_host)
        config = dataclasses.replace(config, parallel=dataclasses.replace(p, dist_port=port))
        p = config.parallel
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, p.world_size):
            worker_config = dataclasses.replace(config, parallel=dataclasses.replace(p, rank=rank))
            proc = ctx.Process(target=worker_main, args=(worker_config,), name=f"megactx-rank{rank}", daemon=True)
            proc.start()
            workers.append(proc)
    backend = "nccl" if torch.device(config.device).type == "cuda" else "gloo"
    try:
        init = "env://" if launched_by_torchrun() else f"tcp://{p.dist_host}:{p.dist_port}"
        dist.init_process_group(backend, init_method=init, rank=p.rank,
                                world_size=p.world_size, timeout=timedelta(seconds=p.dist_timeout))
    except Exception as e:  # torch raises RuntimeError or DistStoreError
        for proc in workers:
            proc.kill()
        raise DistributedError(f"rank {p.rank}: the {p.world_size} ranks did not meet at "
                               f"{p.dist_host}:{p.dist_port} within {p.dist_timeout:.0f} s ({e}); check that "
                               f"every rank started with the same --dist-host and --dist-port") from None
    check_same_settings(config)
    return workers


def settings_fingerprint(config) -> str:
    """Everything that must be equal on every rank: the whole EngineConfig but the rank and the rendezvous."""
    shared = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, rank=0, dist_port=0))
    return hashlib.sha256(repr(shared).encode()).hexdigest()[:16]


def check_same_settings(config) -> None:
    """Every rank compares its settings with the others' at start-up: a rank started with another model or other
    flags would compute garbage that no test could trace back."""
    mine = settings_fingerprint(config)
    every = [None] * config.parallel.world_size
    dist.all_gather_object(every, mine)
    odd = [rank for rank, f in enumerate(every) if f != every[0]]
    if odd:
        raise ConfigError(f"ranks {odd} were started with a model or settings other than rank 0's; start every "
                          f"rank with the same model and flags")


class MirroredRunner:
    """Rank 0's runner: every computing call is sent to the other ranks before it is made here. Other attributes
    (dtype, block_size, backend, ...) are the local runner's."""

    def __init__(self, local: ModelRunner, workers: list, kind: str = "tensor-parallel"):
        """kind: what the group splits, for the error that ends the engine."""
        self.local, self.workers, self.kind = local, workers, kind
        # context parallelism: rank 0 holds every row's final hidden state, the LM head is not split
        self.mirror_logits = kind == "tensor-parallel"

    def __getattr__(self, name):
        return getattr(self.local, name)

    def _send(self, message: tuple) -> None:
        try:
            dist.broadcast_object_list([message], src=0)
        except Exception as e:
            raise self._failure(e) from None

    def _failure(self, e: Exception) -> DistributedError:
        dead = [p.name for p in self.workers if not p.is_alive()]
        why = f"{', '.join(dead)} exited" if dead else f"a rank failed or did not answer ({e})"
        return DistributedError(f"{self.kind} group lost: {why}; the engine cannot go on")

    def forward(self, chunks) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = [ChunkInput.of(ch, self.local.block_size) for ch in chunks]
        self._send(("forward", inputs))
        try:
            return self.local.forward_inputs(inputs)
        except RuntimeError as e:  # a collective inside the model
            raise self._failure(e) from None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.mirror_logits:
            return self.local.logits(hidden)
        hidden = hidden.contiguous()
        self._send(("logits", tuple(hidden.shape)))
        try:
            dist.broadcast(hidden, src=0)
            return self.local.logits(hidden)
        except RuntimeError as e:
            raise self._failure(e) from None

    def close(self) -> None:
        """Stop the other ranks and leave the group."""
        try:
            self._send(("stop",))
        except DistributedError:
            pass
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_steps(runner: ModelRunner) -> None:
    """A rank above 0: make every call rank 0 sends, until it says stop (or the group is lost)."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        kind, *args = message[0]
        if kind == "forward":
            runner.forward_inputs(args[0])
        elif kind == "logits":
            hidden = torch.empty(args[0], dtype=runner.dtype, device=runner.device)
            dist.broadcast(hidden, src=0)
            runner.logits(hidden)
        elif kind == "stop":
            return
