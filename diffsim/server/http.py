"""The HTTP layer: an OpenAI-style image API over an :class:`~diffsim.server.engine.Engine`.

Routes:

* ``POST /v1/images/generations`` -- ``{"prompt", "n", "size", "response_format", "seed"}``; each of the
  ``n`` images is one query through the cascade. 200 with ``{"created", "data": [...]}``; 429 with
  ``Retry-After`` when the admission rule refuses the request; 504 when a query missed its deadline in
  the queue (dropped); 500 when a worker failed the batch; 503 while shutting down; 400 for a bad
  request, 401 for a missing or wrong API key. Every error body is ``{"error": {"message", "type",
  "code", "param"}}``.
* ``GET /v1/plan`` -- the plan in force and the live state (JSON);
* ``GET /v1/quality`` -- with ``--fid-reference``: FID of the sampled served images per window, with the
  sample sizes, or why a window has no FID (JSON); 404 when the server was started without it;
* ``GET /metrics`` -- Prometheus text;
* ``GET /healthz`` -- 200 while serving, 503 while draining.

Nothing here decides anything about scheduling: it validates, hands prompts to the engine and formats
what comes back.
"""

from __future__ import annotations

import base64
import hmac
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueryAnswer, Rejected, Unavailable
from .prometheus import CONTENT_TYPE, ServerMetrics

MAX_SEED = 2**63 - 1
ROUTES = ("/v1/images/generations", "/v1/plan", "/v1/quality", "/metrics", "/healthz")


@dataclass(frozen=True)
class HttpSettings:
    api_key: Optional[str] = None  # require "Authorization: Bearer KEY" on /v1/* and /metrics
    max_n: int = 8  # most images per request
    image_size: Optional[str] = None  # "WxH" the models produce; a request's size must match it
    seed: int = 0  # seeds the server's choice of image seeds when a request gives none
    drain_timeout_s: Optional[float] = None  # engine drain at shutdown (default: the engine's own)


class ImageRequest(BaseModel):
    """The OpenAI image-generation body (``model``, ``quality``, ``style``, ``user`` and other fields
    OpenAI clients send are accepted and ignored: the cascade decides which model serves a prompt)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(default=1, ge=1)
    size: Optional[str] = None
    response_format: str = "b64_json"
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)


def error_body(message: str, type_: str, code: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def error_response(status: int, message: str, type_: str, code: str, param: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def _invalid(message: str, param: Optional[str], code: str = "invalid_value") -> JSONResponse:
    return error_response(400, message, "invalid_request_error", code, param)


def create_app(engine_factory: Callable[[], Awaitable[Engine]], settings: HttpSettings = HttpSettings()) -> FastAPI:
    """The app; ``engine_factory()`` builds and starts the engine when the server starts (lifespan), and
    the engine is drained and stopped when it shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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

    @app.middleware("http")
    async def count_and_authorize(request: Request, call_next):
        path = request.url.path
        if settings.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            if not _authorized(request.headers.get("authorization"), settings.api_key):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          "invalid_request_error", "invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                _count(request, path, response.status_code)
                return response
        response = await call_next(request)
        _count(request, path, response.status_code)
        return response

    @app.post("/v1/images/generations")
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
                                  "unavailable", headers={"Retry-After": "5"})
        return _answer(answers)

    @app.get("/v1/plan")
    async def plan(request: Request):
        return request.app.state.engine.snapshot()

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


def _count(request: Request, path: str, status: int) -> None:
    metrics: Optional[ServerMetrics] = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.http_requests.labels(path if path in ROUTES else "other", str(status)).inc()


def _answer(answers: list[QueryAnswer]):
    """200 with every image, or the error of the first query that did not complete."""
    for a in answers:
        q = a.query
        if q.outcome == "completed":
            continue
        n = len(answers)
        lost = sum(x.query.outcome != "completed" for x in answers)
        what = f"{lost} of {n} images" if n > 1 else "the image"
        if q.outcome == "dropped":
            return error_response(504, f"{what} could not be generated within the deadline "
                                  f"({q.slo_s:g} s SLO) and was dropped from the queue; retry later",
                                  "server_error", "deadline_exceeded")
        return error_response(500, f"{what} failed: {q.error or q.outcome}", "server_error", "worker_failed")
    data = []
    for a in answers:
        q = a.query
        item = {
            "b64_json": base64.b64encode(a.png).decode("ascii"),
            "model": a.model,
            "served_by": q.served_by,
            "confidence": q.confidence,
            "deferred": q.deferred,
            "queue_ms": round(q.queue_s * 1e3, 3),
            "run_ms": round(q.service_s * 1e3, 3),
            "total_ms": round(q.latency_s * 1e3, 3),
        }
        data.append(item)
    return {"created": int(time.time()), "data": data}
