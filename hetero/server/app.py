"""`create_app(state)`: the FastAPI app of `hetero serve` (routes here, bodies in protocol.py,
response shapes in responses.py, the chat-specific text handling in chat.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from hetero.server import chat, errors, responses
from hetero.server.metrics import Metrics
from hetero.server.protocol import ChatRequest, CompletionRequest
from hetero.server.state import ServerState, merged, prepare_all, submit_all

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="hetero", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.server = state
    app.state.metrics = metrics = Metrics(state)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes)

    if state.config.api_key:
        app.add_middleware(APIKey, key=state.config.api_key)

    @app.get("/health")
    def health() -> JSONResponse:
        status = "ok"
        if state.draining:
            status = "draining"
        elif state.loaded is None:
            status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    def models() -> dict:
        name = state.config.model_name
        card = {"id": name, "object": "model", "created": 0, "owned_by": "hetero"}
        if state.loaded is not None:
            card["max_model_len"] = state.loaded.context
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        state.check_model(body.model)
        loaded = state.engine()
        job = chat.prepare(body, loaded, state.config)
        await prepare_all(state, job.params)
        ids = submit_all(state, [job.prompt_ids] * body.n, job.params)
        metrics.requests_started(len(ids))
        if body.stream:
            return StreamingResponse(
                _sse(chat.stream(job, merged(state, ids, metrics.abandoned), metrics)),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        return await _unless_gone(
            request, chat.complete(job, merged(state, ids, metrics.abandoned), metrics)
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        loaded = state.engine()
        job = responses.prepare_completion(body, loaded, state.config.model_name)
        await prepare_all(state, job.params)
        ids = submit_all(state, job.prompts, job.params)
        metrics.requests_started(len(ids))
        if body.stream:
            return StreamingResponse(
                _sse(
                    responses.stream_completion(job, merged(state, ids, metrics.abandoned), metrics)
                ),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        gen = responses.complete_completion(job, merged(state, ids, metrics.abandoned), metrics)
        return await _unless_gone(request, gen)

    static = resources.files("hetero.server") / "static"

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        path = static / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise errors.APIError(404, f"no static file {name!r}")
        return FileResponse(str(path))

    return app


async def _sse(events):
    """Server-sent events: each dict a `data:` line, then `data: [DONE]`; an error mid-stream
    is sent as an error event before [DONE], never a cut connection."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except errors.APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


async def _unless_gone(request: Request, work):
    """A non-streaming answer, abandoned (its engine requests released) if the client goes away
    first: Starlette does not cancel a handler whose client disconnected, so a watcher does."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return Response(status_code=499)
    return task.result()


class APIKey:
    """401 on /v1 without `Authorization: Bearer <key>` (compared in constant time). Pure ASGI,
    as BodyLimit: Starlette's BaseHTTPMiddleware would hide client disconnects from the routes."""

    def __init__(self, app, key: str) -> None:
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.want):
                msg = "a valid API key is required: Authorization: Bearer <key>"
                error = errors.APIError(401, msg, code="invalid_api_key")
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes, by Content-Length or as a chunked body streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = errors.APIError(413, f"the request body is over {self.limit} bytes")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooBig
            return message

        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await too_big.response()(scope, receive, send)


class _TooBig(Exception):
    pass
