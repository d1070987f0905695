"""Limits enforced before a request reaches an endpoint, as a plain ASGI middleware.

- The body is counted while it is read, so a body sent without Content-Length (chunked) is refused as soon as it
  passes the limit, not after it has been read, parsed and tokenized whole.
- The request headers together may take at most MAX_HEADER_BYTES (nginx's default for large headers is 8 KiB x 4;
  a 100 KB header has no use here).
Both answer with an OpenAI-shaped error (413, 431) and never call the app.
"""
from __future__ import annotations

import json

MAX_HEADER_BYTES = 32 * 1024


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
        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        payload = _error(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
