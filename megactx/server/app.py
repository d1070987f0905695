"""The OpenAI-compatible HTTP server (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET|HEAD /health (503 while
the model loads), GET /version, POST /tokenize, POST /detokenize, GET /metrics (Prometheus); the chat page at /
and POST /extract for its attachments (web.py). Errors are
OpenAI-style JSON bodies. Every response carries X-Request-Id (the client's, when it sent one).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastapi.middleware.cors import CORSMiddleware

from megactx.config import EngineConfig, ServerConfig
from megactx.engine.async_engine import AsyncEngine, EngineError
from megactx.errors import MegactxError
from megactx.server.limits import RequestLimits
from megactx.server.metrics import ServerMetrics
from megactx.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                     chat_messages, clean_text)
from megactx.server.responses import ResponseBuilder, error_body
from megactx.server.streaming import collect, stream
from megactx.server.tool_calls import tool_choice_constraint
from megactx.server.web import add_web_routes, is_open

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = int(os.environ.get("MEGACTX_MAX_BODY_BYTES", 64 * 2**20))  # a 1M-token prompt is ~4 MB of text
VERSION = version("megactx")
MAX_CHARS_PER_TOKEN = 32  # text longer than the context x this cannot fit (tokens average 3-5 characters)


def _union_branch(part) -> bool:
    """pydantic's names of a union's branches in an error location ('str', 'list[ContentPart]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "list", "dict") or "[" in part)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class ServerState:
    def __init__(self, config: EngineConfig, served_name: str | None, api_key: str | None):
        self.config, self.api_key = config, api_key
        self.served_name = served_name
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.on_fatal = None  # called when the model cannot load (`megactx serve` stops the server)

    def load(self) -> None:
        from megactx.engine.llm_engine import LLMEngine
        try:
            engine = LLMEngine(self.config)
        except MegactxError as e:
            self.load_error = str(e)
            logger.error("cannot load the model: %s", e)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if self.served_name is None:
            self.served_name = os.path.basename(engine.source.path.rstrip("/")).removesuffix(".gguf")
        self.metrics.bind(engine)
        self.engine = AsyncEngine(engine, on_fatal=self.fatal)
        logger.info("model %s ready", self.served_name)

    def close(self) -> None:
        """Stop the engine's other ranks, if it has any."""
        if self.engine is not None:
            self.engine.engine.close()

    def fatal(self, message: str) -> None:
        """The engine cannot go on (a tensor-parallel rank was lost): answer 503 with why, and end the server."""
        self.load_error, self.engine = message, None
        if self.on_fatal is not None:
            self.on_fatal()

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is still loading; retry when GET /health returns 200",
                           "service_unavailable")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name and name != self.served_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.served_name!r}",
                           "not_found_error")


def create_app(config: EngineConfig, served_name: str | None = None, api_key: str | None = None,
               load_in_background: bool = True, server: ServerConfig | None = None) -> FastAPI:
    state = ServerState(config, served_name, api_key)
    app = FastAPI(title="megactx", version=VERSION)
    app.state.megactx = state
    app.add_middleware(RequestLimits, max_body_bytes=MAX_BODY_BYTES)
    if server is not None and server.allowed_origins:
        origins = [o.strip() for o in server.allowed_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    if load_in_background:
        threading.Thread(target=state.load, name="megactx-load", daemon=True).start()
    else:
        state.load()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        open_paths = ("/health", "/metrics", "/version")
        path = request.url.path
        if state.api_key and path not in open_paths and not is_open(path) and request.method != "OPTIONS":
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                response = JSONResponse(error_body("invalid or missing API key; send 'Authorization: Bearer <key>'",
                                                   401, "authentication_error"), status_code=401)
                response.headers["X-Request-Id"] = request_id
                return response
        response = await call_next(request)
        response.headers["X-Request-Id"] = request_id
        return response

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(e.message, e.status, e.kind, e.param), status_code=e.status)

    @app.exception_handler(MegactxError)
    async def user_error(_, e: MegactxError):
        return JSONResponse(error_body(str(e), 400), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        # of a union's failed branches, the one with our own message says most ("this model takes text only")
        errors = e.errors()
        first = next((x for x in errors if x.get("type") == "value_error"), errors[0] if errors else {})
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and not _union_branch(x))
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        return JSONResponse(error_body(f"{where}: {msg}" if where else msg, 400, param=where or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code)

    add_web_routes(app, ApiError)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading" if not state.load_error else "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """As vLLM serves it: what a client needs to use the server's tokenizer (lm-eval's remote tokenizer)."""
        hf = state.ready().engine.tokenizer.hf
        info = {"tokenizer_class": type(hf).__name__, "model_max_length": state.engine.engine.max_model_len,
                "chat_template": getattr(hf, "chat_template", None)}
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            info[key] = getattr(hf, key, None)
        return info

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": state.served_name, "object": "model", "created": 0, "owned_by": "megactx",
                "max_model_len": state.engine.engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        state.ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.ready()
        state.check_model(model_id)
        return model_card()

    def check_length(*texts: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it (a 70 MB body took minutes of CPU)."""
        limit = state.engine.engine.max_model_len
        chars = sum(len(t) for t in texts)
        if chars > limit * MAX_CHARS_PER_TOKEN:
            raise ApiError(400, f"the text has {chars} characters, far more than this model's context of {limit} "
                                f"tokens can hold; shorten it")

    # the tokenizer runs in a thread: a long text must not stall the event loop (other streams, /health)
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        tok = state.ready().engine.tokenizer
        state.check_model(req.model)
        if req.messages is not None:
            messages = chat_messages(req.messages)
            check_length(*(m["content"] for m in messages))
            ids = await asyncio.to_thread(tok.encode_chat, messages, add_generation_prompt=req.add_generation_prompt)
        elif req.prompt is not None:
            check_length(req.prompt)
            ids = await asyncio.to_thread(tok.encode, clean_text(req.prompt), add_special_tokens=req.add_special_tokens)
        else:
            raise ApiError(400, "give 'prompt' or 'messages'")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        eng = state.ready().engine
        state.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < eng.model_config.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range for a vocabulary of {eng.model_config.vocab_size}")
        return {"prompt": await asyncio.to_thread(eng.tokenizer.decode, req.tokens, skip_special_tokens=False)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        engine = state.ready()
        state.check_model(req.model)
        tok = engine.engine.tokenizer
        messages = chat_messages(req.messages)
        check_length(*(m["content"] for m in messages))
        tools = req.tool_dicts()
        if tools and not tok.supports_tools:
            raise ApiError(400, "this model's chat template has no tool support; send the request without tools or "
                                "serve a model whose template renders them (e.g. Qwen2.5)", param="tools")
        template_args = {"tools": tools} if tools else {}
        ids = await asyncio.to_thread(tok.encode_chat, messages, add_generation_prompt=req.add_generation_prompt,
                                      continue_final_message=req.continue_final_message, **template_args)
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens,
                                     (req.top_logprobs or 0) if req.logprobs else None)
        params.prompt_logprobs = req.prompt_logprobs
        forced = tool_choice_constraint(tools, req.tool_choice, req.parallel_tool_calls) if tools else None
        if forced is not None:
            if params.guided is not None:
                raise ApiError(400, f"tool_choice {req.tool_choice!r} and {params.guided.source} both constrain the "
                                    f"output; give one", param="tool_choice")
            params.guided = forced
        if req.stream and req.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs come with the whole response; send stream: false", param="stream")
        builder = ResponseBuilder("chat", state.served_name, tok, f"chatcmpl-{uuid.uuid4().hex}", bool(tools))
        return await respond(engine, [ids], params, builder, req.stream,
                             bool(req.stream_options and req.stream_options.include_usage), raw,
                             prompt_k=req.prompt_logprobs)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        engine = state.ready()
        state.check_model(req.model)
        tok = engine.engine.tokenizer
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise ApiError(400, "prompt is empty")
        if req.stream and len(prompts) > 1:
            raise ApiError(400, "streaming supports one prompt per request; send the prompts separately")
        check_length(*(x for x in prompts if isinstance(x, str)))
        ids = [await asyncio.to_thread(tok.encode, clean_text(x)) if isinstance(x, str) else list(x) for x in prompts]
        echo = [tok.decode(i, skip_special_tokens=False) if not isinstance(x, str) else x
                for i, x in zip(ids, prompts)] if req.echo else None
        # echo with logprobs (lm-eval's loglikelihood): the prompt tokens' logprobs come first
        echo_k = req.logprobs if req.echo and req.logprobs is not None else None
        wanted = [k for k in (echo_k, req.prompt_logprobs) if k is not None]
        if req.max_tokens == 0 and not (req.echo or wanted):
            raise ApiError(400, "max_tokens 0 generates nothing; use it with echo or prompt_logprobs to score the "
                                "prompt", param="max_tokens")
        if req.stream and wanted:
            raise ApiError(400, "prompt logprobs (echo with logprobs, prompt_logprobs) come with the whole response; "
                                "send stream: false", param="stream")
        params = req.sampling_params(req.max_tokens, req.logprobs)
        params.prompt_logprobs = max(wanted) if wanted else None
        builder = ResponseBuilder("completion", state.served_name, tok, f"cmpl-{uuid.uuid4().hex}")
        return await respond(engine, ids, params, builder, req.stream,
                             bool(req.stream_options and req.stream_options.include_usage), raw, echo,
                             echo_k=echo_k, prompt_k=req.prompt_logprobs)

    async def respond(engine, prompts, params, builder, streaming, include_usage, raw, echo=None, echo_k=None,
                      prompt_k=None):
        for ids in prompts:  # validate all before starting any
            engine.engine.check_prompt(ids, params)
        gens = [engine.generate(ids, params, f"{builder.id}-{i}") for i, ids in enumerate(prompts)]
        if streaming:
            return StreamingResponse(stream(gens[0], builder, params.n, include_usage, state.metrics,
                                            echo[0] if echo else None),
                                     media_type="text/event-stream")
        try:
            outs = await asyncio.gather(*(collect(g, raw) for g in gens))
        except EngineError as e:
            raise ApiError(500, str(e), "internal_server_error") from None
        if any(o is None for o in outs):
            return Response(status_code=499)  # the client went away
        for o in outs:
            state.metrics.finished(o, time.monotonic())
        return builder.full(outs, params.n, echo, echo_k, prompt_k)

    return app
