"""Limits enforced before a request reaches an endpoint, as a plain ASGI middleware.

- The body is counted while it is read, so a body sent without Content-Length (chunked) is refused as soon as it
  passes the limit, not after it has been read, parsed and tokenized whole.
- The request headers together may take at most MAX_HEADER_BYTES (nginx's default for large headers is 8 KiB x 4;
  a 100 KB header has no use here).
Both answer with an OpenAI-shaped error (413, 431) and never call the app.

After a request with a large body has been answered, the heap's free memory is given back to the system
(glibc's malloc_trim): tokenizing a 16 MiB text leaves about 1 GB of freed but resident heap behind otherwise.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import json

MAX_HEADER_BYTES = 32 * 1024
RELEASE_AFTER_BYTES = 1 << 20  # a body this large (text of ~250K tokens) leaves enough freed heap to give back


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the system (a no-op where the C library has no malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _error(status: int, message: str) -> bytes:
    from megactx.server.responses import error_body
    return json.dumps(error_body(message, status)).encode()


class RequestLimits:
    def __init__(self, app, max_body_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app, self.max_body, self.max_headers = app, max_body_bytes, max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
        if header_bytes > self.max_headers:
            return await self._refuse(send, 431, f"request headers of {header_bytes} bytes exceed the limit of "
                                                 f"{self.max_headers}")
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._refuse(send, 413, f"request body of {int(declared)} bytes exceeds the limit of "
                                                 f"{self.max_body}")
        # read the body here, counting: the app then reads it from memory
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await self._refuse(send, 413, f"request body exceeds the limit of {self.max_body} bytes "
                                                     f"(sent without Content-Length, refused while reading)")
            chunks.append(body)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False
        chunks.clear()

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes
        try:
            return await self.app(scope, replay, send)
        finally:
            if size >= RELEASE_AFTER_BYTES:
                del body
                await asyncio.to_thread(release_free_memory)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        payload = _error(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
