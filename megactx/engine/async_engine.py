"""AsyncEngine: the LLMEngine driven by one background thread, fed and read from asyncio.

The engine thread owns the engine: requests to add and abort arrive through a queue and are applied between
steps, so a long prefill chunk never blocks the event loop. Each request's outputs go to its own asyncio.Queue.
An exception inside a step fails the requests that were running (the caller sees EngineError) and the loop
goes on serving the others, unless the engine cannot go on (a tensor-parallel rank was lost): then every request
fails and on_fatal(message) is called, once.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from megactx.engine.distributed import DistributedError
from megactx.engine.llm_engine import LLMEngine
from megactx.outputs import RequestOutput
from megactx.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while computing this request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_fatal=None):
        self.engine, self.on_fatal = engine, on_fatal
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="megactx-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step until it finishes; abort it if the consumer goes away."""
        self.engine.check_prompt(prompt_ids, params)  # RequestError before anything is queued
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    # ---- engine thread --------------------------------------------------------------------------------
    def _apply(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, rid, ids, params = command
            if rid not in self._streams:  # the client left before its request started
                return
            try:
                self.engine.add_request(ids, params, rid)
            except Exception as e:  # noqa: BLE001 -- reported to that request only
                self._fail(rid, e)
        elif kind == "abort":
            self.engine.abort(command[1])

    def _run(self) -> None:
        while True:  # a daemon thread: it ends with the process
            block = not self.engine.has_unfinished()
            try:
                self._apply(self._commands.get(block=block))
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except DistributedError as e:  # nothing more can be computed: fail everything, stop
                logger.error("%s", e)
                for rid in list(self._streams):
                    self._fail(rid, EngineError(str(e)))
                if self.on_fatal is not None:
                    self.on_fatal(str(e))
                return
            except Exception as e:  # noqa: BLE001 -- fail the running requests, keep serving
                logger.exception("engine step failed")
                for seq in list(self.engine.scheduler.running):
                    self.engine.abort(seq.request_id)
                    self._fail(seq.request_id, EngineError(f"internal error while computing this request: {e}"))
                continue
            while self.engine.failures:
                rid, error = self.engine.failures.pop()
                self._fail(rid, EngineError(f"sampling failed for this request: {error}"))
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                elif not out.finished:  # nobody is listening any more
                    self.engine.abort(out.request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)
