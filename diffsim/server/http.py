"""The HTTP layer: an OpenAI-style image API over an :class:`~diffsim.server.engine.Engine`.

Routes:

* ``POST /v1/images/generations`` -- ``{"prompt", "n", "size", "response_format", "seed"}``; each of the
  ``n`` images is one query through the cascade. 200 with ``{"created", "data": [...]}``; 429 with
  ``Retry-After`` when the admission rule refuses the request; 504 when a query missed its deadline in
  the queue (dropped); 500 when a worker failed the batch; 503 with ``Retry-After`` while draining or
  shut down; 400 for a bad request, 401 for a missing or wrong API key. Every error body is
  ``{"error": {"message", "type", "code", "param"}}``; a 504 or 500, whose queries went some way through
  the cascade, also carries ``"queries"``: one record per image of what the server knows of it (outcome,
  deferred, confidence, served_by, queue/run/total ms, error), so that a client counts deferrals and
  times from every answer, not only from 200s.
* ``GET /v1/plan`` -- the plan in force and the live state (JSON);
* ``GET /v1/config`` -- what a simulation of this server needs: cascade curves, the latency profile the
  allocator plans with, every run setting (``diffsim validate`` reads it);
* ``GET /v1/quality`` -- with ``--fid-reference``: FID of the sampled served images per window, with the
  sample sizes, or why a window has no FID (JSON); 404 when the server was started without it;
* ``GET /metrics`` -- Prometheus text;
* ``GET /healthz`` -- 200 ``{"status": "ok"}`` while serving, 503 ``{"status": "draining"}`` while draining.

Shutdown (:class:`DrainingServer`): SIGTERM or SIGINT first *drains*: the socket stays open, new
generation requests get 503 with ``Retry-After``, ``/healthz`` says draining, and every admitted query
is answered; only then does uvicorn close the socket and exit.

Nothing here decides anything about scheduling: it validates, hands prompts to the engine and formats
what comes back.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import random
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueryAnswer, Rejected, Unavailable
from .prometheus import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("diffsim.server")

MAX_SEED = 2**63 - 1
GENERATIONS = "/v1/images/generations"
ROUTES = (GENERATIONS, "/v1/plan", "/v1/config", "/v1/quality", "/metrics", "/healthz")
# Retry-After of a 503: a draining server does not come back by itself, but a replacement (or a sibling
# behind the same load balancer) usually answers within seconds.
UNAVAILABLE_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class HttpSettings:
    api_key: Optional[str] = None  # require "Authorization: Bearer KEY" on /v1/* and /metrics
    max_n: int = 8  # most images per request
    image_size: Optional[str] = None  # "WxH" the models produce; a request's size must match it
    seed: int = 0  # seeds the server's choice of image seeds when a request gives none
    drain_timeout_s: Optional[float] = None  # engine drain at shutdown (default: the engine's own)
    # After the engine has drained, the socket stays open (503s) until no generation request has come for
    # this long, so that clients still sending are told to go elsewhere instead of being refused a
    # connection; at most drain_max_s after the drain began (see DrainingServer).
    drain_quiet_s: float = 2.0
    drain_max_s: float = 30.0


class ImageRequest(BaseModel):
    """The OpenAI image-generation body. Its fields are typed strictly (``"n": "2"`` or ``"n": true`` is a
    400, not a coerced 2 or 1); fields it does not know are ignored, as OpenAI's API does: clients send
    ``model``, ``quality``, ``style``, ``user`` and more, and here the cascade decides which model serves a
    prompt."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(default=1, ge=1)
    size: Optional[str] = None
    response_format: str = "b64_json"
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)


def error_body(message: str, type_: str, code: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def error_response(status: int, message: str, type_: str, code: str, param: Optional[str] = None,
                   headers: Optional[dict] = None, extra: Optional[dict] = None) -> JSONResponse:
    """An OpenAI-style error; ``extra`` adds keys beside ``error`` (clients that know only ``error``
    ignore them)."""
    return JSONResponse({**error_body(message, type_, code, param), **(extra or {})}, status_code=status,
                        headers=headers)


def _invalid(message: str, param: Optional[str], code: str = "invalid_value") -> JSONResponse:
    return error_response(400, message, "invalid_request_error", code, param)


def create_app(engine_factory: Callable[[], Awaitable[Engine]], settings: HttpSettings = HttpSettings()) -> FastAPI:
    """The app; ``engine_factory()`` builds and starts the engine when the server starts (lifespan), and
    the engine is drained and stopped when it shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.last_generation_at = None  # time.monotonic() of the last generation request (drain)
        engine = await engine_factory()
        app.state.engine = engine
        app.state.metrics = ServerMetrics(engine)
        app.state.rng = random.Random(settings.seed)
        try:
            yield
        finally:
            await engine.stop(settings.drain_timeout_s)

    app = FastAPI(title="diffsim", summary="DiffServe-style cascade serving", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _invalid(f"the request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
        msg = first.get("msg", "invalid value")
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
        text = f"{param}: {msg}" if param else f"request body: {msg}"
        return _invalid(text, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code,
                              headers=getattr(exc, "headers", None))

    app.add_middleware(CountAndAuthorize, api_key=settings.api_key)

    @app.post(GENERATIONS)
    async def generations(body: ImageRequest, request: Request):
        engine: Engine = request.app.state.engine
        if body.response_format != "b64_json":
            if body.response_format == "url":
                return _invalid("response_format 'url' is not supported: this server does not store images; "
                                "use 'b64_json' to get them inline", "response_format", "unsupported_value")
            return _invalid(f"response_format must be 'b64_json', got {body.response_format!r}", "response_format")
        if body.n > settings.max_n:
            return _invalid(f"n: at most {settings.max_n} images per request, got {body.n}", "n")
        if body.size is not None and settings.image_size is not None and body.size != settings.image_size:
            return _invalid(f"size: this server's models produce {settings.image_size} images, got {body.size!r}",
                            "size")
        if body.seed is not None:
            seeds = [(body.seed + i) % (MAX_SEED + 1) for i in range(body.n)]
        else:
            rng: random.Random = request.app.state.rng
            seeds = [rng.randrange(2**31) for _ in range(body.n)]
        try:
            answers = await engine.generate([body.prompt] * body.n, seeds)
        except Rejected as e:
            retry = int(e.decision.retry_after_s)
            return error_response(429, str(e), "rate_limit_error", "slo_admission",
                                  headers={"Retry-After": str(retry)})
        except Unavailable as e:
            return error_response(503, f"the server is not accepting requests: {e}", "server_error",
                                  "unavailable", headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})
        return _answer(answers)

    @app.get("/v1/plan")
    async def plan(request: Request):
        return request.app.state.engine.snapshot()

    @app.get("/v1/config")
    async def config(request: Request):
        return request.app.state.engine.describe()

    @app.get("/v1/quality")
    async def quality(request: Request):
        monitor = request.app.state.engine.quality
        if monitor is None:
            return error_response(404, "served-image quality is off: start the server with --fid-reference and "
                                  "--inception-weights", "invalid_request_error", "quality_off")
        return monitor.describe()

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz(request: Request):
        engine: Engine = request.app.state.engine
        body = {
            "status": "draining" if engine.draining else "ok",
            "uptime_s": engine.now,
            "workers": len(engine.workers),
            "pending": engine.pending,
            "cascade": engine.cascade.name,
        }
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    return app


def _authorized(header: Optional[str], key: str) -> bool:
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())


class CountAndAuthorize:
    """Pure ASGI middleware: the API key check (``/v1/*`` and ``/metrics``) and the per-route status counts.

    Pure ASGI rather than Starlette's ``@app.middleware("http")``: that one runs every request through a task
    group of its own, and under a 10x burst it was the largest cost on the event loop (py-spy: most of the
    loop's samples), ahead of parsing and admission -- the time a refused request waits for its 429.
    """

    def __init__(self, app, api_key: Optional[str] = None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == GENERATIONS:
            _note_generation(scope)
        if self.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if not _authorized(header, self.api_key):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          "invalid_request_error", "invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                _count(scope, path, response.status_code)
                return
        status = []

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if status:
                _count(scope, path, status[0])


def _note_generation(scope) -> None:
    state = getattr(scope.get("app"), "state", None)
    if state is not None:
        state.last_generation_at = time.monotonic()


def quiet_wait_s(last_request_at: Optional[float], now: float, quiet_s: float, deadline: float) -> float:
    """How much longer a drained server keeps its socket open: until ``quiet_s`` has passed without a
    generation request, and never past ``deadline`` (0: close now)."""
    if last_request_at is None or now >= deadline:
        return 0.0
    return max(0.0, min(last_request_at + quiet_s, deadline) - now)


def _count(scope, path: str, status: int) -> None:
    app = scope.get("app")
    metrics: Optional[ServerMetrics] = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.http_requests.labels(path if path in ROUTES else "other", str(status)).inc()


def _answer(answers: list[QueryAnswer]):
    """200 with every image, or the error of the first query that did not complete, with a record of
    every query of the request (what the server knows of each: deferred or not, its times)."""
    for a in answers:
        q = a.query
        if q.outcome == "completed":
            continue
        n = len(answers)
        lost = sum(x.query.outcome != "completed" for x in answers)
        what = f"{lost} of {n} images" if n > 1 else "the image"
        records = {"queries": [{"outcome": x.query.outcome, **_metadata(x), "error": x.query.error or None}
                               for x in answers]}
        if q.outcome == "dropped":
            return error_response(504, f"{what} could not be generated within the deadline "
                                  f"({q.slo_s:g} s SLO) and was dropped from the queue; retry later",
                                  "server_error", "deadline_exceeded", extra=records)
        return error_response(500, f"{what} failed: {q.error or q.outcome}", "server_error", "worker_failed",
                              extra=records)
    data = [{"b64_json": base64.b64encode(a.png).decode("ascii"), **_metadata(a)} for a in answers]
    return {"created": int(time.time()), "data": data}


def _metadata(answer: QueryAnswer) -> dict:
    """What a query's record says about how it was served, in an answer's units (ms)."""
    q = answer.query
    latency = q.latency_s
    return {
        "model": answer.model,
        "served_by": q.served_by,
        "confidence": q.confidence,
        "deferred": q.deferred,
        "queue_ms": round(q.queue_s * 1e3, 3),
        "run_ms": round(q.service_s * 1e3, 3),
        "total_ms": None if latency is None else round(latency * 1e3, 3),
    }


class DrainingServer(uvicorn.Server):
    """uvicorn whose shutdown drains first.

    Plain uvicorn closes its listening socket as soon as SIGTERM arrives: a request sent after that is
    refused (connection refused) instead of answered, and ``/healthz`` never gets to say "draining". Here
    the first SIGTERM or SIGINT (or :meth:`request_drain`, or :meth:`begin_drain` on the loop) only
    starts a drain: the engine stops admitting, so new generation requests get 503 with ``Retry-After``
    and ``/healthz`` answers 503 ``{"status": "draining"}``, while the socket stays open and every admitted
    query runs to its outcome. When the engine is idle, or ``drain_timeout_s`` (default: the engine's
    :meth:`~diffsim.server.engine.Engine.default_drain_s`) has passed, the socket still stays open while
    clients keep sending -- until no generation request has come for ``quiet_s`` (at most ``max_s`` after
    the drain began): a client that has not yet noticed the drain gets a 503 with ``Retry-After``, never a
    refused connection. Then the engine is stopped -- a query still pending is answered as failed, still on
    the open socket -- and only then is uvicorn told to exit: it closes the socket, finishes the responses
    being written and returns.

    A second SIGINT exits at once, as in plain uvicorn (the engine is then stopped without waiting).
    The signal is not re-raised after the drain (plain uvicorn does): the drain *is* the handling of
    SIGTERM, so the process ends with status 0.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout_s: Optional[float] = None, *,
                 quiet_s: float = 0.0, max_s: float = 30.0):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.quiet_s = quiet_s
        self.max_s = max_s
        self.drain_requested = False
        self.drained: Optional[bool] = None  # once the drain has ended: whether every query finished in time
        self._drain_task: Optional[asyncio.Task] = None

    def handle_exit(self, sig: int, frame) -> None:
        """The SIGTERM/SIGINT handler uvicorn installs (main thread only). It runs between two bytecodes of
        whatever the loop was doing, so it only sets a flag; :meth:`on_tick` starts the drain."""
        if self.drain_requested and sig == signal.SIGINT:
            self.should_exit = True
            self.force_exit = True
            return
        self.drain_requested = True

    def request_drain(self) -> None:
        """Ask for a drain from any thread (a flag, read by the loop within one uvicorn tick, 0.1 s)."""
        self.drain_requested = True

    async def begin_drain(self) -> None:
        """On the server's loop: start the drain now, and return once the engine refuses new work."""
        self.drain_requested = True
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="diffsim-drain")
        while not (self.engine.draining or self.engine.stopped or self._drain_task.done()):
            await asyncio.sleep(0)  # lets the drain task run up to its first wait

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain_task is None:
            await self.begin_drain()
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        engine = self.engine
        timeout = self.drain_timeout_s if self.drain_timeout_s is not None else engine.default_drain_s()
        began = time.monotonic()
        try:
            if engine.started and not engine.stopped:
                log.info("draining: %d queries pending, up to %.1f s", engine.pending, timeout)
                self.drained = await engine.drain(timeout)
                if not self.drained:
                    log.warning("drain timed out after %.1f s with %d queries pending: they are answered as "
                                "failed", timeout, engine.pending)
                await self._stay_while_clients_send(began)
            await engine.stop(0.0)  # already drained (or out of time): answers what is left, stops workers
        finally:
            self.should_exit = True

    async def _stay_while_clients_send(self, began: float) -> None:
        """Keep the socket open (answering 503) until clients have stopped sending (:func:`quiet_wait_s`).
        Re-reads ``quiet_s`` each round, so it can be changed while waiting."""
        state = getattr(self.config.app, "state", None)
        while not self.force_exit:
            wait = quiet_wait_s(getattr(state, "last_generation_at", None), time.monotonic(), self.quiet_s,
                                began + self.max_s)
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, 0.1))
