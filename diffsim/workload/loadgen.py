"""Open-loop load generator: replay a trace against a running ``diffsim serve`` and measure it.

Each trace request is sent at its arrival time (times ``time_scale``) whether or not earlier ones have
been answered -- open loop, as the trace's users would. Each becomes a :class:`~diffsim.query.Query` on
the client's clock (seconds since the first send) with exactly one outcome:

=====================  ==========================================================================
HTTP answer            outcome
=====================  ==========================================================================
200                    ``completed`` (late when arrival-to-answer > SLO), served by light or heavy
429, 503               ``rejected`` (refused at admission / not accepting)
504                    ``dropped`` (the server dropped it: it missed its deadline in the queue)
other status, network  ``failed`` (with the error)
client timeout         ``failed`` (``client timeout``)
=====================  ==========================================================================

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

from ..reports import metrics
from ..errors import DiffsimError
from ..plan import Plan
from ..profiles import Cascade
from ..query import Query
from .traces import Trace
from .prompts import SAMPLE_CAPTIONS

CAPTIONS = SAMPLE_CAPTIONS

STATUS_OUTCOME = {429: "rejected", 503: "rejected", 504: "dropped"}


@dataclass
class LoadResult:
    queries: list[Query]
    plans: list[tuple[float, Plan]]  # (client time applied, plan)
    demand: list[tuple[float, float, float]]  # (client time, measured rate, demand estimate)
    worker_busy_s: list[float]  # busy time per worker during the run
    duration_s: float  # first send to last answer
    wall_s: float
    server: dict  # the first /v1/plan snapshot (cascade, gpu, policy, routing, ...)
    status_counts: dict[int, int] = field(default_factory=dict)  # HTTP status -> answers (0: no answer)


def prompt_text(trace: Trace, i: int) -> str:
    if trace.prompt is not None and trace.prompt[i]:
        return trace.prompt[i]
    pid = int(trace.prompt_id[i])
    return f"{CAPTIONS[pid % len(CAPTIONS)]} (prompt {pid})"


def request_seed(trace: Trace, i: int) -> int:
    if getattr(trace, "seed", None) is not None:
        return int(trace.seed[i])
    return int(trace.prompt_id[i])


def server_info(url: str, api_key: Optional[str] = None) -> dict:
    """The server's ``GET /v1/plan`` snapshot (which cascade, SLO, GPUs, policy), or a one-line error."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base}/v1/plan", headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise DiffsimError(f"{base}: cannot reach the server ({type(e).__name__}: {e})") from None
    if r.status_code == 401:
        raise DiffsimError(f"{base}: the server wants an API key (--api-key)")
    if r.status_code != 200:
        raise DiffsimError(f"{base}/v1/plan: HTTP {r.status_code}")
    return r.json()


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

    def __init__(self, client, url: str, clock, poll_s: float):
        self.client = client
        self.url = url
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
            r = await self.client.get(self.url)
            r.raise_for_status()
            snap = r.json()
        except Exception:  # noqa: BLE001 - a missed poll only thins the plan history
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
    import httpx

    if not time_scale > 0:
        raise DiffsimError(f"--time-scale: must be > 0, got {time_scale}")
    if not timeout_s > 0:
        raise DiffsimError(f"--timeout-s: must be > 0, got {timeout_s}")
    n = len(trace) if max_requests is None else min(len(trace), max(0, int(max_requests)))
    if n == 0:
        raise DiffsimError("no requests to send (empty trace or --max-requests 0)")
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    wall0 = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        try:
            r = await client.get(f"{base}/v1/plan", timeout=10.0)
        except httpx.HTTPError as e:
            raise DiffsimError(f"{base}: cannot reach the server ({type(e).__name__}: {e})") from None
        if r.status_code == 401:
            raise DiffsimError(f"{base}: the server wants an API key (--api-key)")
        if r.status_code != 200:
            raise DiffsimError(f"{base}/v1/plan: HTTP {r.status_code}")
        first = r.json()
        slo = float(slo_s if slo_s is not None else first.get("slo_s", 0.0)) or 1.0
        busy0 = list(first.get("workers", {}).get("busy_s", []))

        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        recorder = _PlanRecorder(client, f"{base}/v1/plan", clock, poll_s)
        await recorder.poll()
        stop = asyncio.Event()
        poller = asyncio.create_task(recorder.run(stop))
        queries: list[Query] = []
        statuses: dict[int, int] = {}
        last_end = [0.0]

        async def one(i: int, q: Query) -> None:
            body = {"prompt": q.prompt, "n": 1, "response_format": "b64_json", "seed": q.seed}
            try:
                resp = await client.post(f"{base}/v1/images/generations", json=body)
            except httpx.TimeoutException:
                statuses[0] = statuses.get(0, 0) + 1
                q.finish("failed", clock(), error="client timeout")
            except httpx.HTTPError as e:
                statuses[0] = statuses.get(0, 0) + 1
                q.finish("failed", clock(), error=f"{type(e).__name__}: {e}")
            else:
                now = clock()
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                _record(q, resp, now)
            last_end[0] = max(last_end[0], q.finished_s or 0.0)

        arrivals = trace.arrival_s[:n] - trace.arrival_s[0] if n else trace.arrival_s[:0]
        tasks = []
        for i in range(n):
            due = float(arrivals[i]) * time_scale
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            q = Query(i, int(trace.prompt_id[i]), clock(), slo, prompt=prompt_text(trace, i), seed=request_seed(trace, i))
            queries.append(q)
            tasks.append(asyncio.create_task(one(i, q)))
        await asyncio.gather(*tasks)
        stop.set()
        await poller
        last = await recorder.poll()
    busy1 = list((last or {}).get("workers", {}).get("busy_s", []))
    busy = [b1 - b0 for b0, b1 in zip(busy0, busy1)] if busy1 and len(busy1) == len(busy0) else busy1
    return LoadResult(
        queries=queries,
        plans=recorder.plans,
        demand=recorder.demand,
        worker_busy_s=busy,
        duration_s=last_end[0],
        wall_s=time.perf_counter() - wall0,
        server=first,
        status_counts=statuses,
    )


def _record(q: Query, resp, now: float) -> None:
    """Give ``q`` its outcome from the server's answer."""
    status = resp.status_code
    if status == 200:
        try:
            item = resp.json()["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            q.finish("failed", now, error="HTTP 200 without an image in the body")
            return
        q.confidence = item.get("confidence")
        q.deferred = bool(item.get("deferred"))
        served_by = item.get("served_by") or ("heavy" if q.deferred else "light")
        q.stages = ["light", "heavy"] if q.deferred else [served_by]
        q.queue_s = float(item.get("queue_ms") or 0.0) / 1e3
        q.service_s = float(item.get("run_ms") or 0.0) / 1e3
        q.finish("completed", now, served_by)
        return
    message = _error_message(resp)
    outcome = STATUS_OUTCOME.get(status, "failed")
    q.finish(outcome, now, error=f"HTTP {status}: {message}")


def _error_message(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


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
    )
    summary["events"] = None  # a real run has no simulator events
    summary["routing"] = server.get("routing")
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=cascade, window_s=window_s)
    return summary, rows


def write_results(out_dir, result: LoadResult, cascade: Cascade, *, trace_name: str, window_s: float = 10.0,
                  plot: bool = True) -> list[Path]:
    """summary.json, timeseries.csv (and timeline.png), plus queries.csv and plans.csv, as ``simulate``."""
    summary, rows = summary_and_rows(result, cascade, trace_name=trace_name, window_s=window_s)
    out = Path(out_dir)
    written = metrics.write_outputs(out, summary, rows, plot=plot)
    metrics.write_csv(out / metrics.QUERIES_FILE, metrics.query_rows(result.queries), metrics.QUERY_COLUMNS)
    metrics.write_csv(out / metrics.PLANS_FILE, metrics.plan_rows(result.plans), metrics.PLAN_COLUMNS)
    return written + [out / metrics.QUERIES_FILE, out / metrics.PLANS_FILE]
