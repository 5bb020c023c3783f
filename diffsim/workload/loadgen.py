"""Open-loop load generator: replay a trace against a running ``diffsim serve`` and measure what the server did.

Each trace request is sent at its arrival time (times ``time_scale``) whether or not earlier ones have
been answered -- open loop, as the trace's users would. Each becomes a :class:`~diffsim.query.Query` on
the client's clock (seconds since the first send; its arrival is when it was handed to the connection)
and takes its outcome from the server's answer:

=====================  ==========================================================================
HTTP answer            outcome
=====================  ==========================================================================
200                    ``completed`` (late when arrival-to-answer > SLO), served by light or heavy
429, 503               ``rejected`` (refused at admission / draining)
504                    ``dropped`` (the server dropped it: it missed its deadline in the queue)
other status           ``failed`` (with the error)
no answer              none: a *client-side* error (timeout, connection refused or reset); counted apart
=====================  ==========================================================================

Whatever the status, the record the server sends with its answer (``data[0]`` of a 200, ``queries[0]``
of a 504 or 500) gives the query's deferral, confidence, model and times, so a query dropped after it was
deferred counts as deferred. A request the client got no answer to has no server outcome: it is
``unfinished`` in summary.json, and ``client.json`` (:func:`client_report`) counts it by kind, apart from
the server's outcomes, with the client's own overhead: each answer's latency on the client's clock minus
the time the server says it spent (``total_ms``), and how late each request left against its schedule.

The client is one ``aiohttp`` session with no connection limit: every open request has a connection of
its own, and a finished one's connection is reused for the next. ``benchmarks/bench_load_client.py``
measured the choice against a zero-latency server at 100 requests/s and 1,000 open requests (on two
shared cores): httpx's ``AsyncClient`` (whose connection pool is scanned on every request) added 0.5 s
p50 / 2.7 s p99 with 64 kept-alive connections and 41 s p50 with unlimited ones; aiohttp added 2.3 ms
p50 / 26 ms p99 (2.1 / 7.8 ms at 100 open). Idle
connections are kept :data:`KEEPALIVE_S`, less than the server keeps them (uvicorn's 5 s default,
``diffsim serve``'s 30 s), so the client, never the server, closes an idle connection: a request written
onto a connection the server is closing at that moment fails client-side with a read error without
reaching it.

Meanwhile ``GET /v1/plan`` is polled (every ``poll_s``) to rebuild the plan history and the controller's
demand samples on the client's clock, and the workers' busy time is read at the start and the end.
:func:`write_results` hands all of it to :mod:`diffsim.reports.metrics`, so ``summary.json`` and
``timeseries.csv`` have exactly the keys and meaning of ``diffsim simulate``'s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..reports import metrics
from ..errors import DiffsimError
from ..progress import progress_bar
from ..plan import Plan
from ..profiles import Cascade
from ..query import Query
from .traces import Trace
from .prompts import SAMPLE_CAPTIONS

CAPTIONS = SAMPLE_CAPTIONS

STATUS_OUTCOME = {429: "rejected", 503: "rejected", 504: "dropped"}
KEEPALIVE_S = 2.0  # idle kept-alive connections are closed by the client after this (see the module docstring)
PLAN_TIMEOUT_S = 10.0  # one GET /v1/plan
CLIENT_FILE = "client.json"


@dataclass
class LoadResult:
    queries: list[Query]
    plans: list[tuple[float, Plan]]  # (client time applied, plan)
    demand: list[tuple[float, float, float]]  # (client time, measured rate, demand estimate)
    worker_busy_s: list[float]  # busy time per worker during the run
    duration_s: float  # first send to last answer
    wall_s: float
    server: dict  # the first /v1/plan snapshot (cascade, gpu, policy, routing, ...)
    status_counts: dict[int, int] = field(default_factory=dict)  # HTTP status -> answers
    client_errors: dict[str, int] = field(default_factory=dict)  # kind -> requests without an answer
    client_error_examples: dict[str, str] = field(default_factory=dict)  # kind -> its first message
    server_total_s: list[Optional[float]] = field(default_factory=list)  # per query: the server's total_ms / 1e3
    send_lag_s: list[float] = field(default_factory=list)  # per query: hand-off time minus its scheduled time


def prompt_text(trace: Trace, i: int) -> str:
    if trace.prompt is not None and trace.prompt[i]:
        return trace.prompt[i]
    pid = int(trace.prompt_id[i])
    return f"{CAPTIONS[pid % len(CAPTIONS)]} (prompt {pid})"


def request_seed(trace: Trace, i: int) -> int:
    if getattr(trace, "seed", None) is not None:
        return int(trace.seed[i])
    return int(trace.prompt_id[i])


def _aiohttp():
    try:
        import aiohttp
    except ImportError:
        raise DiffsimError("diffsim load needs aiohttp: pip install -e '.[serve]'") from None
    return aiohttp


def client_session(api_key: Optional[str], timeout_s: float):
    """The client, an ``aiohttp.ClientSession`` to use with ``async with``: no limit on open connections,
    idle ones kept :data:`KEEPALIVE_S` (module docstring), each request given ``timeout_s`` in all.
    Benchmarks that send their own requests use it too, to measure the server through the same client."""
    aiohttp = _aiohttp()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(headers=headers, connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def fetch_plan(session, base: str) -> dict:
    """The server's ``GET /v1/plan`` snapshot, or a one-line DiffsimError."""
    aiohttp = _aiohttp()
    try:
        async with session.get(f"{base}/v1/plan", timeout=aiohttp.ClientTimeout(total=PLAN_TIMEOUT_S)) as r:
            if r.status == 401:
                raise DiffsimError(f"{base}: the server wants an API key (--api-key)")
            if r.status != 200:
                raise DiffsimError(f"{base}/v1/plan: HTTP {r.status}")
            snap = await r.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise DiffsimError(f"{base}: cannot reach the server ({_describe(e)})") from None
    except ValueError:
        raise DiffsimError(f"{base}/v1/plan: the answer is not JSON (is this a diffsim server?)") from None
    if not isinstance(snap, dict):
        raise DiffsimError(f"{base}/v1/plan: expected a JSON object")
    return snap


def server_info(url: str, api_key: Optional[str] = None) -> dict:
    """The server's ``GET /v1/plan`` snapshot (which cascade, SLO, GPUs, policy), or a one-line error."""

    async def get() -> dict:
        async with client_session(api_key, PLAN_TIMEOUT_S) as session:
            return await fetch_plan(session, url.rstrip("/"))

    return asyncio.run(get())


def cascade_for(server: dict, name: Optional[str] = None, cascades: Optional[str] = None) -> Cascade:
    """The cascade whose SLO and quality curves score the run: ``name`` (default: the server's) from the
    cascades file, with the server's SLO and GPU name."""
    from ..profiles import build_cascade, load_cascades, load_gpu_profile
    from ..resources import profiles_dir, resolve_profile

    name = name or server.get("cascade")
    if not name:
        raise DiffsimError("the server did not say which cascade it serves: pass --cascade")
    path = Path(cascades) if cascades else profiles_dir() / "cascades.yaml"
    profile_path = resolve_profile("a100")  # latencies are not used for scoring; the curves are
    cascade = build_cascade(name, load_gpu_profile(profile_path), load_cascades(path), profile_path, path)
    if server.get("cascade") and server["cascade"] != name:
        raise DiffsimError(f"--cascade {name} but the server serves {server['cascade']}")
    return replace(cascade, slo_s=float(server.get("slo_s", cascade.slo_s)), gpu=str(server.get("gpu", cascade.gpu)))


class _PlanRecorder:
    """Polls ``GET /v1/plan`` and keeps the plans and demand samples on the client's clock."""

    def __init__(self, session, base: str, clock, poll_s: float):
        self.session = session
        self.base = base
        self.clock = clock
        self.poll_s = poll_s
        self.plans: list[tuple[float, Plan]] = []
        self.demand: list[tuple[float, float, float]] = []
        self._plan_id: Optional[int] = None
        self._ticks: Optional[int] = None
        self.errors = 0

    async def poll(self) -> Optional[dict]:
        sent = self.clock()
        try:
            snap = await fetch_plan(self.session, self.base)
        except DiffsimError:  # a missed poll only thins the plan history
            self.errors += 1
            return None
        now = (sent + self.clock()) / 2
        if snap.get("plan") is not None and snap.get("plan_id") != self._plan_id:
            self._plan_id = snap.get("plan_id")
            applied = max(0.0, now - (float(snap["now_s"]) - float(snap["applied_s"])))
            if self.plans and applied < self.plans[-1][0]:
                applied = self.plans[-1][0]
            self.plans.append((applied, Plan.from_dict(snap["plan"])))
        ctrl = snap.get("controller") or {}
        if ctrl.get("ticks") and ctrl.get("ticks") != self._ticks:
            self._ticks = ctrl["ticks"]
            self.demand.append((max(0.0, now), float(ctrl.get("rate_qps", 0.0)), float(ctrl.get("demand_qps", 0.0))))
        return snap

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll()
            try:
                await asyncio.wait_for(stop.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass


async def run_load(
    url: str,
    trace: Trace,
    *,
    time_scale: float = 1.0,
    max_requests: Optional[int] = None,
    timeout_s: float = 60.0,
    api_key: Optional[str] = None,
    poll_s: float = 1.0,
    slo_s: Optional[float] = None,
) -> LoadResult:
    """Replay ``trace`` against the server at ``url`` (its base, e.g. ``http://127.0.0.1:8000``)."""
    if not time_scale > 0:
        raise DiffsimError(f"--time-scale: must be > 0, got {time_scale}")
    if not timeout_s > 0:
        raise DiffsimError(f"--timeout-s: must be > 0, got {timeout_s}")
    n = len(trace) if max_requests is None else min(len(trace), max(0, int(max_requests)))
    if n == 0:
        raise DiffsimError("no requests to send (empty trace or --max-requests 0)")
    base = url.rstrip("/")
    wall0 = time.perf_counter()
    async with client_session(api_key, timeout_s) as session:
        first = await fetch_plan(session, base)
        slo = float(slo_s if slo_s is not None else first.get("slo_s", 0.0)) or 1.0
        busy0 = list(first.get("workers", {}).get("busy_s", []))

        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        recorder = _PlanRecorder(session, base, clock, poll_s)
        await recorder.poll()
        stop = asyncio.Event()
        poller = asyncio.create_task(recorder.run(stop))
        result = LoadResult(queries=[], plans=recorder.plans, demand=recorder.demand, worker_busy_s=[],
                            duration_s=0.0, wall_s=0.0, server=first,
                            server_total_s=[None] * n, send_lag_s=[0.0] * n)
        queries: list[Optional[Query]] = [None] * n
        arrivals = (trace.arrival_s[:n] - trace.arrival_s[0]) * time_scale

        aiohttp = _aiohttp()

        async def one(i: int) -> None:
            now = clock()
            result.send_lag_s[i] = max(0.0, now - float(arrivals[i]))
            q = queries[i] = Query(i, int(trace.prompt_id[i]), now, slo, prompt=prompt_text(trace, i),
                                   seed=request_seed(trace, i))
            body = {"prompt": q.prompt, "n": 1, "response_format": "b64_json", "seed": q.seed}
            try:
                async with session.post(f"{base}/v1/images/generations", json=body) as resp:
                    status = resp.status
                    raw = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                kind = _error_kind(e)
                result.client_errors[kind] = result.client_errors.get(kind, 0) + 1
                result.client_error_examples.setdefault(kind, _describe(e))
                q.error = f"client: {_describe(e)}"  # no server outcome: 'unfinished' in the summary
                return
            now = clock()
            result.status_counts[status] = result.status_counts.get(status, 0) + 1
            result.server_total_s[i] = _record(q, status, _json_or_none(raw), now, raw[:200].decode("utf-8", "replace"))

        tasks = []
        # requests ended (answered or failed client-side), on stderr when it is a terminal
        with progress_bar(total=n, desc="requests done", unit="req", delay=1.0) as bar:
            for i in range(n):
                delay = float(arrivals[i]) - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
                tasks[-1].add_done_callback(lambda _: bar.update(1))
            await asyncio.gather(*tasks)
        stop.set()
        await poller
        last = await recorder.poll()
    busy1 = list((last or {}).get("workers", {}).get("busy_s", []))
    result.queries = [q for q in queries if q is not None]
    result.worker_busy_s = [b1 - b0 for b0, b1 in zip(busy0, busy1)] if busy1 and len(busy1) == len(busy0) else busy1
    result.duration_s = max((q.finished_s for q in result.queries if q.finished_s is not None), default=0.0)
    result.wall_s = time.perf_counter() - wall0
    return result


def _json_or_none(raw: bytes):
    import json

    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_kind(e: BaseException) -> str:
    """A short name for a client-side failure (the keys of ``client_errors``)."""
    aiohttp = _aiohttp()
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "payload"
    if isinstance(e, aiohttp.ClientOSError):
        return "os-error"
    return type(e).__name__


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _server_record(status: int, body) -> Optional[dict]:
    """The server's record of the (first) query of an answer: ``data[0]`` of a 200, ``queries[0]`` of an
    error that carries records; None when the answer has none."""
    if not isinstance(body, dict):
        return None
    items = body.get("data" if status == 200 else "queries")
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0]
    return None


def _record(q: Query, status: int, body, now: float, text: str = "") -> Optional[float]:
    """Give ``q`` its outcome from the server's answer (``body``: the parsed JSON, or None), and what the
    server's record says of it whatever the status. Returns the server's total time (s) when it said."""
    record = _server_record(status, body) or {}
    q.confidence = _number(record.get("confidence"))
    q.deferred = bool(record.get("deferred"))
    served_by = record.get("served_by") or None
    q.queue_s = (_number(record.get("queue_ms")) or 0.0) / 1e3
    q.service_s = (_number(record.get("run_ms")) or 0.0) / 1e3
    total_ms = _number(record.get("total_ms"))
    if status == 200:
        if not record or "b64_json" not in record:
            q.finish("failed", now, error="HTTP 200 without an image in the body")
            return total_ms / 1e3 if total_ms is not None else None
        served_by = served_by or ("heavy" if q.deferred else "light")
        # a deferred query served light (the light fallback) never ran on the heavy model
        q.stages = ["light", "heavy"] if q.deferred and served_by != "light" else [served_by]
        q.finish("completed", now, served_by)
    else:
        q.stages = ["light", "heavy"] if q.deferred else ([served_by] if served_by else [])
        told = record.get("outcome")
        outcome = told if told in metrics.OUTCOMES and told != "completed" else STATUS_OUTCOME.get(status, "failed")
        q.finish(outcome, now, served_by if outcome == "completed" else None,
                 error=f"HTTP {status}: {_error_message(body, text)}")
    return total_ms / 1e3 if total_ms is not None else None


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _error_message(body, text: str) -> str:
    try:
        return str(body["error"]["message"])
    except (KeyError, TypeError):
        return text[:200]


def client_report(result: LoadResult) -> dict:
    """What the client saw, apart from the server's outcomes (client.json): the HTTP statuses, the
    server's outcomes among the answers, the requests that got no answer by kind, and the client's own
    overhead: answer latency on the client's clock minus the server's own ``total_ms``, and how late
    each request was handed to its connection against the schedule."""
    overhead, ratios = [], []
    for q, server_s in zip(result.queries, result.server_total_s):
        if server_s is None or q.latency_s is None:
            continue
        overhead.append(q.latency_s - server_s)
        if server_s > 0:
            ratios.append(q.latency_s / server_s)
    answered = [q for q in result.queries if q.outcome is not None]
    return {
        "requests": len(result.queries),
        "answered": len(answered),
        "http_status": {str(k): v for k, v in sorted(result.status_counts.items())},
        "server_outcomes": {name: sum(q.outcome == name for q in answered) for name in metrics.OUTCOMES},
        "deferred_in_answers": sum(q.deferred for q in answered),
        "client_errors": dict(sorted(result.client_errors.items())),
        "client_error_examples": dict(sorted(result.client_error_examples.items())),
        "client_overhead_ms": _percentiles(overhead, 1e3),
        "client_over_server_ratio": _percentiles(ratios, 1.0),
        "send_lag_ms": _percentiles(result.send_lag_s[: len(result.queries)], 1e3),
    }


def _percentiles(values, scale: float) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def summary_and_rows(result: LoadResult, cascade: Cascade, *, trace_name: str, window_s: float = 10.0):
    """``summary.json`` and ``timeseries.csv`` contents, as ``diffsim simulate`` makes them."""
    server = result.server
    summary = metrics.summarize(
        result.queries,
        result.plans,
        cascade=cascade,
        gpus=int(server.get("gpus", len(result.worker_busy_s) or 1)),
        worker_busy_s=result.worker_busy_s,
        duration_s=result.duration_s,
        wall_s=result.wall_s,
        policy=str(server.get("policy", "")),
        seed=None,
        trace=trace_name,
        window_s=window_s,
        demand=result.demand,
        fallback=server.get("fallback", "none") != "none",  # the FID that does not flatter light fallbacks
    )
    summary["events"] = None  # a real run has no simulator events
    summary["routing"] = server.get("routing")
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=cascade, window_s=window_s)
    return summary, rows


def write_results(out_dir, result: LoadResult, cascade: Cascade, *, trace_name: str, window_s: float = 10.0,
                  plot: bool = True) -> list[Path]:
    """summary.json, timeseries.csv (and timeline.png), plus queries.csv and plans.csv, as ``simulate``;
    and client.json (:func:`client_report`), which only a real run has."""
    summary, rows = summary_and_rows(result, cascade, trace_name=trace_name, window_s=window_s)
    out = Path(out_dir)
    written = metrics.write_outputs(out, summary, rows, plot=plot)
    metrics.write_csv(out / metrics.QUERIES_FILE, metrics.query_rows(result.queries), metrics.QUERY_COLUMNS)
    metrics.write_csv(out / metrics.PLANS_FILE, metrics.plan_rows(result.plans), metrics.PLAN_COLUMNS)
    metrics.dump_json(out / CLIENT_FILE, client_report(result))
    return written + [out / metrics.QUERIES_FILE, out / metrics.PLANS_FILE, out / CLIENT_FILE]
