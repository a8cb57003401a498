"""The OpenAI-compatible HTTP API (FastAPI): routes, request reading, errors, streaming.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, ``GET /metrics``, and the chat page (``GET /``, ui.py). Every error is OpenAI's
``{"error": {"message", "type", "code", "param"}}``. A stream sends an SSE comment whenever it has had nothing
to send for ``keepalive`` seconds (judging a first answer can take longer than a proxy waits).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ContextOverflowError, InputError, SDAError
from ..judging import JudgeError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, UnsupportedField
from .service import GenerationService, Overloaded, Plan
from .shapes import Collected, Shaper
from .ui import PUBLIC_PATHS, add_ui_routes

log = logging.getLogger("sda_local.server")

KEEPALIVE_SECONDS = 2.0  # well inside the 5 s a front end or proxy may be set to wait for a byte


@dataclass
class ServerConfig:
    model_id: str
    api_key: Optional[str] = None
    max_body: int = 1 << 20
    queue_size: int = 16
    retry_after: int = 1  # seconds, for 429
    keepalive: float = KEEPALIVE_SECONDS  # a stream's SSE comment after this long with nothing to send
    cors_origins: tuple = ()  # origins whose pages may call the API (--cors-origin); none by default


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


def error_body(message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                        headers=exc.headers)


def api_error_of(exc: BaseException) -> ApiError:
    """The HTTP error for an exception raised while planning or running a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(429, "the server is busy: every slot is taken and the queue is full; retry later",
                        type_="rate_limit_error", code="server_busy")
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    if isinstance(exc, JudgeError):
        return ApiError(502, f"the judge failed: {exc}", type_="server_error", code="judge_failed")
    if isinstance(exc, SDAError):
        return ApiError(500, str(exc), type_="server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error")


class ServerState:
    """What the routes share: the service once the model has loaded, or why it has not."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.service: Optional[GenerationService] = None
        self.load_error: Optional[str] = None
        self.metrics: Optional[Metrics] = None
        self.closing = False


def create_app(config: ServerConfig, load: Callable[[], tuple]) -> FastAPI:
    """The app. ``load()`` -> (engine, judge) runs in a thread at startup; until it returns, /health and
    every API route answer 503."""
    state = ServerState(config)

    def load_in_background():
        try:
            engine, judge = load()
        except BaseException as exc:  # told by every route (/health without detail); the process stays up
            state.load_error = str(exc) or type(exc).__name__
            log.error("the model failed to load: %s", state.load_error)
            return
        scheduler = engine.scheduler
        metrics = Metrics({
            "queue_length": ("Requests waiting for a slot.", lambda: scheduler.queue_length),
            "slots_busy": ("Slots generating.", lambda: scheduler.busy_slots),
            "slots_total": ("Slots (--parallel).", lambda: len(scheduler.slots)),
        })
        scheduler.start()
        state.metrics = metrics
        state.service = GenerationService(engine, judge, model_id=config.model_id, queue_size=config.queue_size,
                                          metrics=metrics)
        if state.closing:
            _shutdown(state)

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=load_in_background, name="sda-load", daemon=True)
        loader.start()
        yield
        state.closing = True
        await asyncio.get_running_loop().run_in_executor(None, _shutdown, state)

    app = FastAPI(title="sda-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sda = state

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        _count(state, request, exc.status)
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        _count(state, request, exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error", "not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        _count(state, request, 500)
        return _error_response(api_error_of(exc))

    if config.api_key:
        app.add_middleware(_ApiKeyGate, key=config.api_key, state=state)
    if config.cors_origins:  # outermost: a browser's preflight (no Authorization header) is answered here
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.get("/health")
    async def health():
        if state.load_error is not None:  # unauthenticated: the detail (a file path) is in the log only
            return JSONResponse(error_body("the model failed to load (see the server's log)", "server_error"),
                                status_code=503)
        if state.service is None:
            return JSONResponse(error_body("loading model", "unavailable_error", "loading"), status_code=503)
        return {"status": "ok"}

    def model_object(service: GenerationService) -> dict:
        # "sda": what a front end (the chat page) needs to offer the request's choices
        return {"id": config.model_id, "object": "model", "created": 0, "owned_by": "sda-local",
                "sda": service.capabilities()}

    @app.get("/v1/models")
    async def models(request: Request):
        service = _ready(state)
        _count(state, request, 200)
        return {"object": "list", "data": [model_object(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        service = _ready(state)
        if model_id != config.model_id:
            raise ApiError(404, f"no model {model_id!r}: this server serves {config.model_id!r}",
                           code="model_not_found", param="model")
        _count(state, request, 200)
        return model_object(service)

    add_ui_routes(app)

    @app.get("/metrics")
    async def metrics(request: Request):
        _ready(state)
        _count(state, request, 200)
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(state, request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(state, request, CompletionRequest, "text")

    return app


class _ApiKeyGate:
    """'Authorization: Bearer KEY' on every route but /health. Plain ASGI, not @app.middleware("http"):
    Starlette's BaseHTTPMiddleware hides a client's disconnect from the route (request.is_disconnected()
    stays False), so a generation would run on for a client long gone."""

    def __init__(self, app, *, key: str, state: "ServerState"):
        self.app, self.key, self.state = app, key.encode(), state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = Request(scope).headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            if self.state.metrics is not None:
                self.state.metrics.observe_request(scope["path"], 401)
            response = _error_response(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                                code="invalid_api_key"))
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _shutdown(state: ServerState) -> None:
    service = state.service
    if service is None:
        return
    state.service = None
    service.engine.scheduler.stop(timeout=5.0)
    if service.judge is not None:
        service.judge.close()
    service.engine.close()


def _count(state: ServerState, request: Request, status: int) -> None:
    if state.metrics is not None:
        state.metrics.observe_request(request.url.path, status)


def _ready(state: ServerState) -> GenerationService:
    if state.load_error is not None:  # the detail (a file path) is in the server's log
        raise ApiError(503, "the model failed to load (see the server's log)", type_="server_error")
    if state.service is None:
        raise ApiError(503, "loading model", type_="unavailable_error", code="loading")
    return state.service


async def _read_json(request: Request, max_body: int) -> dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got {content_type or 'none'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"the body is over {max_body} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ApiError(413, f"the body is over {max_body} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body was in (or cut off by the body deadline, protocol.py)
        raise ClientGone() from None
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {str(exc)[:120]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedField):
        return ApiError(400, str(cause), code="unsupported_field", param=cause.field)
    return ApiError(400, f"{where}: {message}" if where else message, param=where or None)


async def _complete(state: ServerState, request: Request, schema, kind: str):
    service = _ready(state)
    try:
        raw = await _read_json(request, state.config.max_body)
    except ClientGone:
        return _client_gone(state, request)
    try:
        body = schema.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    try:
        service.admit()
    except Overloaded as exc:
        error = api_error_of(exc)
        error.headers = {"Retry-After": str(state.config.retry_after)}
        raise error from None
    try:
        plan = service.plan_chat(body) if kind == "chat" else service.plan_completion(body)
    except BaseException as exc:
        service.release()
        raise api_error_of(exc) from None
    response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    shaper = Shaper(service.engine.model, service.model_id, plan, kind, response_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        _count(state, request, 200)
        return _EventStream(_stream(service, plan, shaper, include_usage, state.config.keepalive), service.release)
    try:
        collected = await _collect(service, plan, request)
    except ClientGone:  # nobody to answer: its generation was cancelled
        return _client_gone(state, request)
    except BaseException as exc:
        raise api_error_of(exc) from None
    finally:
        service.release()
    _count(state, request, 200)
    return shaper.response(collected)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away before the answer


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _client_gone(state: ServerState, request: Request) -> Response:
    """Logged and counted as nginx does (499), never as a server error."""
    log.warning("%s %s: the client disconnected before its answer (499)", request.method, request.url.path)
    _count(state, request, CLIENT_CLOSED_REQUEST)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _collect(service: GenerationService, plan: Plan, request: Request) -> Collected:
    """The whole answer; stops the generation (ClientGone) if the client disconnects meanwhile."""
    async def gather():
        collected = Collected()
        async for delta in service.run(plan):
            collected.add(delta)
        return collected

    task = asyncio.ensure_future(gather())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # whatever it ended with, nobody is there to hear it
                pass
            raise ClientGone()
    return await task


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


KEEPALIVE_EVENT = ": keep-alive\n\n"  # an SSE comment: every client's parser skips it


async def _stream(service: GenerationService, plan: Plan, shaper: Shaper, include_usage: bool, keepalive: float):
    if shaper.kind == "chat":
        yield _sse(shaper.chunk(delta={"role": "assistant", "content": ""}))
    loop = asyncio.get_running_loop()
    deltas = service.run(plan).__aiter__()
    pending: Optional[asyncio.Future] = None
    last_sent = loop.time()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(deltas.__anext__())
            # Silence counts from the last byte sent: a delta that sends nothing (reasoning on /v1/completions)
            # does not reset it.
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, last_sent + keepalive - loop.time()))
            if not done:  # judging, a long prefill, a queue: a byte so that no proxy takes the stream for dead
                yield KEEPALIVE_EVENT
                last_sent = loop.time()
                continue
            finished, pending = pending, None
            try:
                delta = finished.result()
            except StopAsyncIteration:
                break
            chunk = shaper.delta_chunk(delta)
            if chunk is not None:
                yield _sse(chunk)
                last_sent = loop.time()
    except Exception as exc:  # of any kind: the status is sent already, so the error goes in the stream
        error = api_error_of(exc)
        if error.status >= 500 and not isinstance(exc, (SDAError, ApiError)):
            log.exception("a stream failed")
        yield _sse(error_body(error.message, error.type, error.code))
        yield "data: [DONE]\n\n"
        return
    finally:
        if pending is not None:  # the client went away mid-wait: stop the generation under it
            pending.cancel()
            try:
                await pending
            except BaseException:  # its cancellation, or whatever it was failing with: nobody to tell
                pass
        await deltas.aclose()
    yield _sse(shaper.final_chunk())
    if include_usage:
        yield _sse(shaper.usage_chunk())
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that release the request's place when the response ends in any way: finished,
    failed, or cut by a client that went away (then the generation is cancelled at the next step)."""

    def __init__(self, events, on_close: Callable[[], None]):
        # X-Accel-Buffering: nginx (and proxies that follow it) pass each event on at once.
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()  # runs the generator's cleanup (cancels its job) if it started
            finally:
                self._on_close()
