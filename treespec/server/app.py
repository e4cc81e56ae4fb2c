"""The OpenAI-compatible FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

The app sees the engine only through an EngineClient (engine_client.py: submit, stream, abort, shutdown): one
AsyncEngine in this process, or K replicas behind Ray Serve (replicas/). Bodies are parsed by hand under a
size limit and validated by the strict models in protocol.py, so every bad input is a 400 in OpenAI's error
shape (404 for an unknown model, 429 when the queue is full, 503 while loading or shutting down).
"""
from __future__ import annotations

import asyncio
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from treespec.engine.async_engine import AsyncEngine
from treespec.errors import EngineClosedError, QueueFullError, TreespecError
from treespec.server.auth import ApiKeyMiddleware
from treespec.server.engine_client import DeltaStream, EngineClient
from treespec.server.errors import ApiError, ErrorType, bad_request, from_validation_error, install_error_handlers
from treespec.server.metrics import CONTENT_TYPE, RequestTimer, ServerMetrics
from treespec.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from treespec.server.responses import DONE, Endpoint, ResponseBuilder, sse
from treespec.tokenizer import Tokenizer


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None              # None: no authentication
    max_body_bytes: int = 1 << 20
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    drain_timeout: float = 30.0             # seconds running requests get at shutdown; then they end as "abort"


@dataclass
class Backend:
    engine: EngineClient  # an AsyncEngine, or a ReplicaPool (--data-parallel-size)
    tokenizer: Tokenizer


def create_app(async_engine: AsyncEngine | None, tokenizer: Tokenizer | None, model_name: str | None = None,
               api_key: str | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app; with async_engine None it answers 503 until attach_engine() (the CLI loads in a thread)."""
    settings = settings or ServerSettings(model_name=model_name or "treespec", api_key=api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await drain(app)

    app = FastAPI(title="treespec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.backend, app.state.load_error = settings, None, None
    app.state.started = int(time.time())
    app.state.metrics = ServerMetrics(settings.model_name, lambda: _snapshot(app))
    if async_engine is not None:
        attach_engine(app, async_engine, tokenizer)
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:  # added last = outermost, so preflight requests never need the key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    _add_routes(app)
    return app


def attach_engine(app: FastAPI, async_engine: EngineClient, tokenizer: Tokenizer) -> None:
    app.state.backend = Backend(async_engine, tokenizer)


async def drain(app: FastAPI) -> None:
    """Refuse new requests, give running ones drain_timeout seconds, then end the rest with finish_reason "abort",
    so each stream still sends its last chunk and [DONE]. Safe to call twice (the lifespan calls it again)."""
    if app.state.backend is not None:
        await app.state.backend.engine.shutdown(app.state.settings.drain_timeout)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that starts drain() as soon as shutdown begins. uvicorn waits for open responses and only
    then runs the lifespan, so without this an expired wait cancels streams mid-body (no [DONE], a traceback
    each); give it timeout_graceful_shutdown a few seconds above drain_timeout, as a last resort."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.create_task(drain(self.config.app))
        await super().shutdown(sockets)
        await draining


def _snapshot(app: FastAPI):
    return app.state.backend.engine.snapshot if app.state.backend is not None else None


def _add_routes(app: FastAPI) -> None:
    settings: ServerSettings = app.state.settings
    metrics: ServerMetrics = app.state.metrics

    @app.get("/health")
    async def health() -> Response:
        if app.state.load_error is not None:
            return ApiError(503, f"model failed to load: {app.state.load_error}", ErrorType.UNAVAILABLE).response()
        if app.state.backend is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if app.state.backend is not None:
            await app.state.backend.engine.refresh_snapshot()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        backend = _backend(app)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "treespec",
                                            "created": app.state.started,
                                            "max_model_len": backend.engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        timer = metrics.timer()
        backend = _backend(app)
        body = _parse(CompletionRequest, await _read_body(request, settings.max_body_bytes))
        _check_model(body.model, settings.model_name)
        prompt_ids = body.prompt if isinstance(body.prompt, list) else \
            await asyncio.to_thread(backend.tokenizer.encode, body.prompt)
        return await _serve(request, backend, timer, Endpoint.COMPLETION, body, prompt_ids, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        timer = metrics.timer()
        backend = _backend(app)
        body = _parse(ChatCompletionRequest, await _read_body(request, settings.max_body_bytes))
        _check_model(body.model, settings.model_name)
        prompt_ids = await asyncio.to_thread(_chat_prompt_ids, backend.tokenizer, body)
        return await _serve(request, backend, timer, Endpoint.CHAT, body, prompt_ids, body.requested_max_tokens)


# ---- request handling ---------------------------------------------------------------------------------------------
def _backend(app: FastAPI) -> Backend:
    if app.state.backend is None:
        raise ApiError(503, "the model is still loading", ErrorType.UNAVAILABLE, code="loading")
    return app.state.backend


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(400, f"request body exceeds {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model: type[SamplingFields], body: bytes) -> SamplingFields:
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as e:
        raise from_validation_error(e) from None


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ApiError(404, f"model {requested!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _chat_prompt_ids(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    messages = [m.as_template_input() for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, raise_exception(...))
        raise bad_request(f"messages: the chat template rejected them: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


async def _serve(request: Request, backend: Backend, timer: RequestTimer, endpoint: Endpoint,
                 body: SamplingFields, prompt_ids: list[int], max_tokens: int | None) -> Response:
    room = backend.engine.max_model_len - len(prompt_ids)
    if max_tokens is None:
        if room <= 0:
            raise bad_request(f"prompt: {len(prompt_ids)} tokens do not fit the context length "
                              f"{backend.engine.max_model_len}")
        max_tokens = room
    builder = ResponseBuilder(endpoint, timer.metrics.model_name, len(prompt_ids), body.n, body.return_token_ids)
    stream = await _submit(backend.engine, body, prompt_ids, max_tokens, builder.id)
    if body.stream:
        return StreamingResponse(_sse_events(stream, builder, timer, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_close_on_disconnect(request, stream))
    try:
        async for delta in stream:
            timer.observe(delta)
            builder.add(delta)
    finally:
        watcher.cancel()
        stream.close()
    if builder.error is not None:
        raise ApiError(500, builder.error, ErrorType.SERVER, code="engine_error")
    return JSONResponse(builder.response())


async def _submit(engine: EngineClient, body: SamplingFields, prompt_ids: list[int], max_tokens: int,
                  request_id: str) -> DeltaStream:
    try:
        params = body.sampling_params(max_tokens)
        return await engine.submit(prompt_ids, params, request_id, speculate=body.speculate)
    except QueueFullError as e:
        raise ApiError(429, f"{e}; retry later", ErrorType.RATE_LIMIT, code="queue_full") from None
    except EngineClosedError as e:
        raise ApiError(503, str(e), ErrorType.UNAVAILABLE, code="shutting_down") from None
    except TreespecError as e:  # ConfigError: a request the engine cannot take (too long, bad token id, ...)
        raise bad_request(str(e)) from None


async def _close_on_disconnect(request: Request, stream: DeltaStream) -> None:
    """Abort a non-streaming request whose client went away (streams are cancelled by Starlette instead)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.close()


async def _sse_events(stream: DeltaStream, builder: ResponseBuilder, timer: RequestTimer,
                      body: SamplingFields) -> AsyncIterator[bytes]:
    """SSE body: role chunks (chat), content chunks, finish chunks, optional usage chunk, then [DONE].

    An engine error sends an error event and still [DONE]; a disconnect cancels this generator, and the
    finally clause aborts whatever is unfinished.
    """
    try:
        for chunk in builder.role_chunks():
            yield sse(_with_usage(chunk, builder, body))
        async for delta in stream:
            timer.observe(delta)
            builder.add(delta)
            if delta.error is not None:
                yield sse(ApiError(500, delta.error, ErrorType.SERVER, code="engine_error").body())
                break
            for chunk in builder.delta_chunks(delta):
                yield sse(_with_usage(chunk, builder, body))
        else:
            if body.include_usage:
                yield sse(builder.usage_chunk())
        yield DONE
    finally:
        stream.close()


def _with_usage(chunk: dict, builder: ResponseBuilder, body: SamplingFields) -> dict:
    if body.continuous_usage:
        chunk["usage"] = builder.usage()
    elif body.include_usage:
        chunk["usage"] = None
    return chunk
