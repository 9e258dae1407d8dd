"""The HTTP server: OpenAI's routes over a Scheduler, with the API key, the body limit, errors in OpenAI's
shape, server-sent event streams and metrics.

`create_app` answers at once; the model loads in a thread started when the app starts (`load` returns
the running Scheduler), and until then /health and the generation routes answer 503. A client that
goes away has its generation cancelled, streamed or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from heavylift.defaults import SERVE_DRAIN_SECONDS, SERVE_MAX_BODY_BYTES
from heavylift.errors import HeavyliftError
from . import protocol
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, InvalidRequest
from .responses import ChatRender, CompletionRender, Outcome, Render
from .events import Delta, Done, Failed, PromptScores, QueueFullError, StoppingError, Stream
from .scheduler import Scheduler

log = logging.getLogger("heavylift.serve")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable_error"}
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ModelCard:
    """What the HTTP layer knows of the model before it loads."""

    name: str  # what clients pass as "model"
    tokenizer: Any
    context: int  # prompt + generated tokens per sequence, as planned
    vocab_size: int  # rows of the embedding: the token ids a prompt may hold


class ApiError(Exception):
    """An answer other than 200: its status, the message for the client, the field concerned, a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class Backend:
    """The model as the routes see it: loading (scheduler None), then a running Scheduler, then stopped.

    `load` returns the Scheduler unstarted: it starts here, unless the server stopped while the model loaded
    (a Ctrl-C during loading must not leave a worker thread behind). `on_loaded` hears once: None when the
    scheduler runs, else the exception that stopped loading.
    """

    def __init__(self, load: Callable[[], Scheduler], on_loaded: Callable[[BaseException | None], None] | None):
        self._load, self._on_loaded = load, on_loaded or (lambda error: None)
        self._lock = threading.Lock()
        self._stopped = False
        self.scheduler: Scheduler | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="heavylift-load", daemon=True).start()

    def _run(self) -> None:
        try:
            scheduler = self._load()
            with self._lock:
                if self._stopped:
                    return
                scheduler.start()
                scheduler.ready.wait()  # warmed up (on a GPU: every batch size's graphs captured)
                if scheduler.failure is not None:
                    raise scheduler.failure
                self.scheduler = scheduler
        except BaseException as e:  # noqa: BLE001 - handed to whoever started the server, which reports it
            self._on_loaded(e)
            return
        self._on_loaded(None)

    def stop(self, drain_seconds: float) -> None:
        """Stop the scheduler once (later calls return at once), letting its requests run `drain_seconds`."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            scheduler = self.scheduler
        if scheduler is not None:
            scheduler.shutdown(drain_seconds)


class _Job:
    """One request's Stream, timed for the metrics; cancelled unless it ended with Done or Failed."""

    def __init__(self, stream: Stream, metrics: Metrics, arrived: float):
        self.stream, self.metrics, self.arrived = stream, metrics, arrived
        self.ended = False

    async def events(self) -> AsyncIterator:
        async for event in self.metrics.timed(self.stream, self.arrived):
            self.ended = isinstance(event, (Done, Failed))
            yield event

    def cancel(self) -> None:
        if not self.ended:
            self.stream.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends: finished, client gone,
    or server stopping."""

    def __init__(self, content: AsyncIterator[bytes], job: _Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class _CountAnswers:
    """ASGI middleware counting every answer by route and status (unknown paths as one route, "other")."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = "/v1/models" if path.startswith("/v1/models/") else path if path in ROUTES else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _data(body: dict) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _sse(render: Render, job: _Job, include_usage: bool) -> AsyncIterator[bytes]:
    """The events of `job` as OpenAI's chunks, ending with [DONE]; a failure mid-stream is an error event."""
    opening = render.opening()
    if opening is not None:
        yield _data(render.chunk(opening, include_usage))
    done = None
    async for event in job.events():
        choice = None
        if isinstance(event, PromptScores):
            choice = render.prompt(event.tokens)
        elif isinstance(event, Delta) and (event.text or (event.tokens and render.alternatives is not None)):
            choice = render.delta(event.text, event.tokens)
        elif isinstance(event, Done):
            choice, done = render.closing(event), event
        elif isinstance(event, Failed):
            yield _data(error_body(event.status, event.message))
            break
        if choice is not None:
            yield _data(render.chunk(choice, include_usage))
    else:
        if done is None:  # cancelled by the server while it stops
            yield _data(error_body(503, "the server stopped before this request finished"))
    if done is not None and include_usage:
        yield _data(render.usage_chunk(done))
    yield DONE_EVENT


async def _gather(job: _Job) -> Outcome:
    outcome = Outcome()
    async for event in job.events():
        if isinstance(event, PromptScores):
            outcome.prompt = event.tokens
        elif isinstance(event, Delta):
            outcome.pieces.append(event.text)
            outcome.tokens.extend(event.tokens)
        elif isinstance(event, Done):
            outcome.done = event
        elif isinstance(event, Failed):
            raise ApiError(event.status, event.message)
    if outcome.done is None:
        raise ApiError(503, "the server stopped before this request finished")
    return outcome


async def _cancel_when_gone(request: Request, job: _Job) -> None:
    """Wait for the client to disconnect (its body is read: the next message is the disconnect), then
    cancel its generation."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _whole(request: Request, job: _Job) -> Outcome:
    watcher = asyncio.ensure_future(_cancel_when_gone(request, job))
    try:
        return await _gather(job)
    finally:
        watcher.cancel()
        job.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body is over the server's limit of {limit:,} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(card: ModelCard, load: Callable[[], Scheduler], api_key: str | None = None,
               max_body_bytes: int = SERVE_MAX_BODY_BYTES, drain_seconds: float = SERVE_DRAIN_SECONDS,
               on_loaded: Callable[[BaseException | None], None] | None = None) -> FastAPI:
    """The server for `card`: its model loads (`load`, see Backend) in a thread once the app starts; on
    stopping, requests in flight get `drain_seconds` to finish. `api_key`: the key the /v1 routes require."""
    backend = Backend(load, on_loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        yield
        await asyncio.to_thread(backend.stop, drain_seconds)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(lambda: backend.scheduler.stats() if backend.scheduler is not None else None)
    app.add_middleware(_CountAnswers, metrics=metrics)
    app.state.backend, app.state.metrics = backend, metrics
    _add_error_handlers(app, card)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key; send it as the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def running(request: Request) -> Scheduler:
        authorize(request)
        scheduler = backend.scheduler
        if scheduler is None:
            raise ApiError(503, f"{card.name} is still loading; retry when GET /health answers 200",
                           code="model_loading")
        return scheduler

    async def parsed(request: Request, kind):
        body = protocol.parse(await _read_body(request, max_body_bytes), kind)
        if body.model != card.name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {card.name!r}",
                           "model", "model_not_found")
        return body

    async def answer(request: Request, scheduler: Scheduler, job_request, render: Render, body, arrived: float):
        job = _Job(scheduler.submit(job_request), metrics, arrived)
        if body.stream:
            return _EventStream(_sse(render, job, body.include_usage), job)
        return JSONResponse(render.whole(await _whole(request, job)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        scheduler = running(request)
        body: ChatRequest = await parsed(request, ChatRequest)
        prompt = protocol.chat_prompt(body, card.tokenizer)
        job_request = protocol.to_request(body, prompt, card.context)
        render = ChatRender(card.name, card.tokenizer, body.alternatives)
        return await answer(request, scheduler, job_request, render, body, arrived)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived = time.perf_counter()
        scheduler = running(request)
        body: CompletionRequest = await parsed(request, CompletionRequest)
        prompt, text = protocol.completion_prompt(body, card.tokenizer, card.vocab_size)
        job_request = protocol.to_request(body, prompt, card.context)
        render = CompletionRender(card.name, card.tokenizer, body.alternatives, text if body.echo else None)
        return await answer(request, scheduler, job_request, render, body, arrived)

    model_entry = {"id": card.name, "object": "model", "created": int(time.time()), "owned_by": "heavylift",
                   "max_model_len": card.context}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_entry]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        authorize(request)
        if name != card.name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {card.name!r}",
                           code="model_not_found")
        return model_entry

    @app.get("/health")
    async def health():
        if backend.scheduler is None:
            message = f"{card.name} is still loading"
            return JSONResponse({"status": "loading", **error_body(503, message, code="model_loading")}, 503)
        return {"status": "ok", "model": card.name}

    @app.get("/metrics")
    async def prometheus(request: Request):
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    return app


def _add_error_handlers(app: FastAPI, card: ModelCard) -> None:
    """Every refusal in OpenAI's error shape; a client's mistake is never logged with a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, e: InvalidRequest):
        return _error(400, str(e), e.param)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, e: QueueFullError):
        return _error(429, str(e), code="queue_full")

    @app.exception_handler(StoppingError)
    async def stopping(request: Request, e: StoppingError):
        return _error(503, str(e), code="shutting_down")

    @app.exception_handler(HeavyliftError)
    async def refused(request: Request, e: HeavyliftError):  # e.g. a prompt the tokenizer cannot encode
        return _error(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; use {e.headers.get('Allow', '')}"
        else:
            message = str(e.detail)
        return _error(e.status_code, message, headers=e.headers)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, e: ClientDisconnect):  # the client left while sending its body
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # a heavylift bug: logged with its traceback by uvicorn
        return _error(500, f"internal error ({type(e).__name__}); the server's log has the details")
