"""The chat page at / (static files in megactx/server/static, same origin as the API, nothing from a CDN) and
POST /extract, which turns an attached file into text for it (documents.py).

The page and its assets are open without the API key (they hold no data); the page asks for the key when the
API answers 401 and keeps it in the browser's sessionStorage.
"""
from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from megactx.server.documents import DocumentError, extract

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    """The page and its assets need no API key."""
    return path == "/" or path.startswith(OPEN_PREFIXES)


def add_web_routes(app: FastAPI, api_error) -> None:
    """api_error(status, message): the app's OpenAI-shaped error."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.post("/extract")
    async def extract_text(request: Request, name: str = "upload"):
        """The request body is the file's bytes; -> {"text", "files", "pages", "skipped"}."""
        data = await request.body()
        try:
            doc = await asyncio.to_thread(extract, data, name)  # a long PDF takes seconds: not on the event loop
        except DocumentError as e:
            raise api_error(400, str(e)) from None
        return {"name": name, "text": doc.text, "files": doc.files, "pages": doc.pages, "skipped": doc.skipped,
                "characters": len(doc.text)}
