"""The OpenAI-compatible HTTP API over a ``BatchEngine`` (FastAPI; served by uvicorn).

Routes: ``GET /health`` (open), ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or
server-sent events ending with ``data: [DONE]``). With an API key every route but
``/health`` needs ``Authorization: Bearer KEY`` (compared in constant time). Every error is
OpenAI's JSON error body with a 4xx (or 503 with ``Retry-After`` when the queue is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ipcv_deploy.serve.engine import BatchEngine, Event, Job, QueueFullError
from ipcv_deploy.serve.images import load_request_image
from ipcv_deploy.serve.protocol import (
    ApiError,
    ServerLimits,
    chat_chunk,
    chat_completion,
    completion_id,
    parse_chat_request,
)

__all__ = ["create_app"]


def _error(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    merged = {**err.headers, **(headers or {})}
    return JSONResponse(err.body(), status_code=err.status, headers=merged)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    return bytes(body)


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()


def create_app(
    engine: BatchEngine,
    model_id: str,
    limits: ServerLimits,
    api_key: str | None = None,
) -> FastAPI:
    """The API serving ``engine``'s pipeline under the name ``model_id``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.close)  # in-flight requests are done by now

    app = FastAPI(title="ipcv-deploy", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if expected is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(
                    ApiError(
                        401,
                        "missing or wrong API key; send Authorization: Bearer <key>",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(ApiError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": engine.queued, "running": engine.busy}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "ipcv"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            body = await _read_body(request, limits.max_body_bytes)
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ApiError(400, f"the request body is not valid JSON: {err}") from None
            chat = parse_chat_request(data, model_id, limits)
            image = await run_in_threadpool(load_request_image, chat.images[0], limits)
            prompt = await run_in_threadpool(engine.pipeline.chat_prompt, chat.messages)
            job = Job(chat, prompt, image, asyncio.get_running_loop())
            try:
                engine.submit(job)
            except QueueFullError:
                raise ApiError(
                    503,
                    f"the server is busy ({engine.max_queue} requests queued); retry shortly",
                    code="server_busy",
                    kind="server_error",
                    headers={"Retry-After": "1"},
                ) from None
        except ApiError as err:
            return _error(err)
        headers = {}
        if chat.ignored:
            fields = ", ".join(chat.ignored)
            headers["Warning"] = f'299 ipcv-deploy "ignored unsupported fields: {fields}"'
        try:
            first = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if first.kind == "error":
            return _error(first.error, headers)
        cid = completion_id()
        if chat.stream:
            return StreamingResponse(
                _stream(job, first, cid, model_id),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        text, event = first.text, first
        while event.kind in ("started", "delta"):
            event = await job.events.get()
            text += event.text
        if event.kind == "error":
            return _error(event.error, headers)
        body = chat_completion(cid, model_id, text, event.finish_reason, event.usage)
        return JSONResponse(body, headers=headers)

    return app


async def _stream(job: Job, first: Event, cid: str, model: str) -> AsyncIterator[bytes]:
    """The server-sent events of one request; a client that leaves cancels its job."""
    try:
        yield _sse(chat_chunk(cid, model, {"role": "assistant", "content": ""}))
        event = first
        while event.kind in ("started", "delta"):
            if event.kind == "delta":
                yield _sse(chat_chunk(cid, model, {"content": event.text}))
            event = await job.events.get()
        if event.kind == "error":
            yield _sse(event.error.body())
        else:
            yield _sse(chat_chunk(cid, model, {}, event.finish_reason))
            if job.request.include_usage:
                yield _sse(chat_chunk(cid, model, None, usage=event.usage))
        yield _sse("[DONE]")
    finally:
        job.cancelled = True  # a no-op once done; frees the slot if the client left
