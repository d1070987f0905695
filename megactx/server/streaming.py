"""Turning an engine output stream into an SSE stream or one final output."""
from __future__ import annotations

import time
from typing import AsyncIterator

from megactx.engine.async_engine import EngineError
from megactx.errors import MegactxError
from megactx.outputs import RequestOutput
from megactx.server.responses import SSE_DONE, ResponseBuilder, error_body, prefill_comment, sse
from megactx.server.tool_calls import ToolCallStream


async def collect(gen: AsyncIterator[RequestOutput], raw) -> RequestOutput | None:
    """The final output; None if the client disconnected (the request is then aborted)."""
    last = None
    try:
        async for out in gen:
            last = out
            if not out.finished and await raw.is_disconnected():
                return None
    finally:
        await gen.aclose()
    return last


async def stream(gen: AsyncIterator[RequestOutput], b: ResponseBuilder, n: int, include_usage: bool, metrics,
                 echo: str | None = None) -> AsyncIterator[str]:
    sent_text = [0] * n
    sent_tokens = [0] * n
    done = [False] * n
    tool_streams = [ToolCallStream() for _ in range(n)] if b.tools else None
    for i in range(n):
        yield b.chunk(i, echo or "", None, None, role=True)
    last_progress = -1
    last = None
    try:
        async for out in gen:
            last = out
            progress = out.metrics.get("prefill_done", 0)
            prefilling = out.metrics.get("first_token_time") is None
            # while prefilling, and once when a prompt came from the prefix cache (it may need no prefill step)
            if progress != last_progress and (prefilling or (last_progress < 0 and out.usage.cached_tokens)):
                last_progress = progress
                yield prefill_comment(out)
            if prefilling:
                continue
            for c in out.outputs:
                i = c.index
                if done[i]:
                    continue
                text = c.text[sent_text[i]:]
                new_tokens = len(c.token_ids)
                if text or c.finish_reason or (c.logprobs is not None and new_tokens > sent_tokens[i] and text):
                    logprobs = b.logprobs_for(c, sent_tokens[i], new_tokens, sent_text[i])
                    sent_text[i] += len(text)
                    sent_tokens[i] = new_tokens
                    finish, calls = c.finish_reason, None
                    if tool_streams is not None:  # tool-call blocks are held back and sent parsed at the end
                        text = tool_streams[i].feed(text)
                        if finish is not None:
                            rest, calls = tool_streams[i].finish()
                            text += rest
                            finish = "tool_calls" if calls and finish == "stop" else finish
                    if text or finish or logprobs:
                        yield b.chunk(i, text, finish, logprobs, tool_calls=calls)
                done[i] = c.finish_reason is not None
    except MegactxError as e:  # the request was refused once it reached the engine
        yield sse(error_body(str(e), 400))
        yield SSE_DONE
        return
    except Exception as e:  # noqa: BLE001 -- a stream that fails ends with an error event, then [DONE]
        message = str(e) if isinstance(e, EngineError) else f"internal error: {type(e).__name__}: {e}"
        yield sse(error_body(message, 500, "internal_server_error"))
        yield SSE_DONE
        return
    finally:
        await gen.aclose()
    if last is not None and last.finished:
        metrics.finished(last, time.monotonic())
        if include_usage:
            yield b.usage_chunk(last)
    yield SSE_DONE
