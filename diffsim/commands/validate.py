"""``diffsim validate``: how far the simulator predicts a running server, measured.

1. Reads the server's own description (``GET /v1/config``): its cascade's curves, the latency profile its
   allocator plans with, and every run setting (policy, workers, routing, SLO, batch sizes, controller,
   admission, deadline sweep).
2. Replays the trace against it ``--repeats`` times with ``diffsim load`` (open loop), to measure the real
   system and its own run-to-run spread; each run's reports go to ``OUT/real-K/``.
3. Simulates the same trace with the same settings -- the server's profile, scaled per stage by how much
   slower than it the server's batches really ran during step 2 (the server measures every batch; the
   mean of measured / profile time, from ``GET /v1/plan``; ``--no-calibrate`` keeps the profile as it
   is), with batch times sampled around its p50 (``--service-time``), the request overhead measured in
   step 2 (client latency minus the server's own time; its p50, p95 and p99, each request's drawn from
   a log-normal fitted to them with ``--service-time sampled``), and the per-prompt confidences the
   server reported -- into ``OUT/sim/``.
4. Writes ``OUT/validation.json`` (per figure: sim, the real values, the error, the real spread,
   within_spread), prints the table, and plots latency CDFs and violations per window
   (``OUT/validation.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path

from .. import limits
from ..errors import DiffsimError
from .args import bounded, nonempty


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        help="measure how far the simulator predicts a running server (sim vs K real runs of a trace)",
        description=__doc__.split("\n\n", 1)[1].replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", required=True, type=nonempty, help="the running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", required=True, type=nonempty, metavar="FILE", help="trace CSV, a path or a shipped name")
    p.add_argument("--out", required=True, type=nonempty, metavar="DIR", help="output folder")
    p.add_argument("--repeats", type=limits.REPEATS, default=3, metavar="K",
                   help=bounded("real runs of the trace", limits.REPEATS, 3))
    p.add_argument("--max-requests", type=limits.COUNT, metavar="N",
                   help=bounded("send only the first N requests of the trace", limits.COUNT))
    p.add_argument("--time-scale", type=limits.TIME_SCALE, default=1.0,
                   help=bounded("multiply arrival times", limits.TIME_SCALE, 1))
    p.add_argument("--service-time", choices=("p50", "sampled"), default="sampled",
                   help="the simulator's batch times (default sampled: around the profile's p50 by its p95/p99)")
    p.add_argument("--pause-s", type=limits.DELAY_S, default=5.0, metavar="S",
                   help="idle time between real runs, so that one run's backlog and demand estimate do not "
                   "spill into the next (default 5)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="simulate with the server's profile as it is, not scaled by the batch times it measured")
    p.add_argument("--api-key", metavar="KEY", help="the server's API key, if it wants one")
    p.add_argument("--window-s", type=limits.WINDOW_S, default=10.0, metavar="S",
                   help=bounded("time-series window", limits.WINDOW_S, 10))


def fetch_config(url: str, api_key=None) -> dict:
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base}/v1/config", headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise DiffsimError(f"{base}: cannot reach the server ({type(e).__name__}: {e})") from None
    if r.status_code == 401:
        raise DiffsimError(f"{base}: the server wants an API key (--api-key)")
    if r.status_code == 404:
        raise DiffsimError(f"{base}/v1/config: not found (a diffsim serve older than validate?)")
    if r.status_code != 200:
        raise DiffsimError(f"{base}/v1/config: HTTP {r.status_code}")
    return r.json()


def scaled_profile(profile: dict, light_model: str, heavy_model: str, ratio: dict) -> dict:
    """``profile`` (as /v1/config gives it) with each stage's latencies times its measured ratio: the
    light model's and the discriminator's by the light stage's, the heavy model's by the heavy stage's."""
    def scale(table: dict, r) -> dict:
        if not r:
            return table
        out = dict(table)
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            if out.get(key) is not None:
                out[key] = [None if v is None else round(v * r, 3) for v in out[key]]
        return out

    data = dict(profile)
    models = dict(data["models"])
    models[light_model] = scale(models[light_model], ratio.get("light"))
    models[heavy_model] = scale(models[heavy_model], ratio.get("heavy"))
    data["models"] = models
    data["discriminator"] = scale(data["discriminator"], ratio.get("light"))
    return data


def sim_config_from(described: dict, *, service_time: str, overhead=None, ratio=None):
    """The :class:`~diffsim.config.SimConfig` of a simulation of the described server (its profile scaled
    by ``ratio`` per stage, see :func:`scaled_profile`; its request overhead replaced by ``overhead``, the
    ``overheads`` fields of :func:`request_overhead_ms`)."""
    from ..config import ControllerConfig, SimConfig
    from ..profiles import CascadesFile, GpuProfile, build_cascade

    c = described["cascade"]
    profile_data = dict(described["profile"])
    if ratio:
        profile_data = scaled_profile(profile_data, c["light"], c["heavy"], ratio)
    if overhead is not None:
        kept = {k: v for k, v in profile_data.get("overheads", {}).items() if not k.startswith("request_")}
        profile_data["overheads"] = {**kept, **overhead}
    profile = GpuProfile.model_validate(profile_data)
    spec = {k: c[k] for k in ("light", "heavy", "slo_s", "deferral_curve", "fid") if k in c}
    spec["deferral_curve"] = c["deferral_curve"]
    if "fid_random_mix" in c:
        spec["fid_random_mix"] = c["fid_random_mix"]
    cascades = CascadesFile.model_validate({
        "provenance": {"source": "diffsim serve: GET /v1/config", "gpu": profile.gpu, "date": "unknown"},
        "cascades": {c["name"]: spec},
    })
    cascade = build_cascade(c["name"], profile, cascades, "<server profile>", "<server cascades>")
    run = described["run"]
    static_plan = run.get("static_plan")
    return SimConfig(
        cascade=cascade, gpus=int(run["gpus"]), policy=run["policy"], seed=int(run["seed"]),
        controller=ControllerConfig(**run["controller"]), routing=run["routing"],
        drop_factor=float(run["drop_factor"]), batch_timeout_s=float(run["batch_timeout_s"]),
        swap_s=float(run["swap_s"]), batch_sizes=tuple(run["batch_sizes"]),
        static_plan=dict(static_plan) if static_plan else None, max_utilization=float(run["max_utilization"]),
        batch_wait=float(run["batch_wait"]), admission=bool(run["admission"]),
        deadline_sweep_s=float(run["deadline_sweep_s"]), service_time=service_time,
        queue_model=run.get("queue_model"), tail_quantile=float(run.get("tail_quantile", 0.99)),
    )


def measured_ratio(url: str, api_key=None) -> dict:
    """Per stage, how much slower than the profile the server's batches ran (its measured mean)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        snap = httpx.get(f"{url.rstrip('/')}/v1/plan", headers=headers, timeout=10.0).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {role: r for role, r in (snap.get("service_time_ratio") or {}).items() if r}


def request_overhead_ms(runs) -> dict:
    """The request overhead's percentiles (ms) over every request answered 200, as the profile's
    ``overheads`` takes them: ``request_ms`` (p50), ``request_p95_ms``, ``request_p99_ms`` of client
    latency minus the server's own time for the request (its queueing and batches). All 0 without answers."""
    import numpy as np

    gaps = [1e3 * (q.latency_s - q.queue_s - q.service_s) for result in runs for q in result.queries
            if q.outcome == "completed" and q.latency_s is not None]
    if not gaps:
        return {"request_ms": 0.0, "request_p95_ms": 0.0, "request_p99_ms": 0.0}
    p50, p95, p99 = (round(float(v), 3) for v in np.percentile(np.maximum(gaps, 0.0), [50, 95, 99]))
    return {"request_ms": p50, "request_p95_ms": p95, "request_p99_ms": p99}


def measured_confidences(runs, cascade, seed: int):
    """Per-prompt confidences the server reported (light images are scored, whatever the request's
    status), falling back to the cascade's deferral curve for prompts never scored."""
    from ..runtime.confidence import Confidences

    conf = Confidences.from_curve(cascade.deferral, seed)
    known = {}
    for result in runs:
        for q in result.queries:
            if q.confidence is not None:
                known.setdefault(q.prompt_id, float(q.confidence))
    conf.learn(known)
    return conf, len(known)


def run(args: argparse.Namespace) -> int:
    from ..reports import metrics
    from ..reports.comparison import summarize_result
    from ..reports.validation import compare, figures_of, format_table, plot
    from ..resources import resolve_trace
    from ..simulator import simulate
    from ..workload.loadgen import run_load, summary_and_rows, write_results
    from ..workload.traces import read_trace

    described = fetch_config(args.url, args.api_key)
    trace = read_trace(resolve_trace(args.trace))
    if args.max_requests is not None:
        trace = _head(trace, args.max_requests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim_config = sim_config_from(described, service_time=args.service_time)
    cascade = sim_config.cascade
    runs, real_figures, real_rows = [], [], []
    for k in range(args.repeats):
        if k:
            import time

            time.sleep(args.pause_s)
        print(f"real run {k + 1}/{args.repeats}: {len(trace)} requests against {args.url}", flush=True)
        result = asyncio.run(run_load(args.url, trace, time_scale=args.time_scale, api_key=args.api_key))
        runs.append(result)
        summary, rows = summary_and_rows(result, cascade, trace_name=args.trace, window_s=args.window_s)
        write_results(out / f"real-{k + 1}", result, cascade, trace_name=args.trace, window_s=args.window_s)
        real_figures.append(figures_of(summary, result.queries))
        real_rows.append(rows)
    overhead = request_overhead_ms(runs)
    ratio = {} if args.no_calibrate else measured_ratio(args.url, args.api_key)
    sim_config = sim_config_from(described, service_time=args.service_time, overhead=overhead, ratio=ratio)
    confidences, scored = measured_confidences(runs, sim_config.cascade, sim_config.seed)
    scaled = _scaled(trace, args.time_scale)
    sim = simulate(sim_config, scaled, confidences=confidences)
    sim_summary = summarize_result(sim, args.trace)
    sim_rows = metrics.timeseries(sim.queries, sim.plans, sim.demand, cascade=sim_config.cascade,
                                  window_s=args.window_s)
    metrics.write_outputs(out / "sim", sim_summary, sim_rows, plot=False)
    comparison = compare(figures_of(sim_summary, sim.queries), real_figures)
    report = {
        "url": args.url, "trace": args.trace, "requests": len(trace), "repeats": args.repeats,
        "service_time": args.service_time, "request_overhead_ms": overhead, "prompts_scored": scored,
        "profile_scaled_by": ratio,
        "server": {"cascade": described["cascade"]["name"], "policy": described["run"]["policy"],
                   "gpus": described["run"]["gpus"], "routing": described["run"]["routing"],
                   "slo_s": described["cascade"]["slo_s"]},
        "figures": comparison,
    }
    (out / "validation.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot(out / "validation.png", sim.queries, [r.queries for r in runs], sim_rows, real_rows)
    print(format_table(comparison))
    scale_text = ", ".join(f"{role} x{r:.2f}" for role, r in ratio.items() if r) or "not scaled"
    print(f"request overhead p50 {overhead['request_ms']:.1f} ms, p95 {overhead['request_p95_ms']:.1f} ms, "
          f"p99 {overhead['request_p99_ms']:.1f} ms; profile {scale_text}; "
          f"wrote {out / 'validation.json'}, {out / 'validation.png'}")
    return 0


def _head(trace, n: int):
    from ..workload.traces import Trace

    return Trace(arrival_s=trace.arrival_s[:n], prompt_id=trace.prompt_id[:n],
                 prompt=None if trace.prompt is None else trace.prompt[:n], source=trace.source,
                 seed=None if trace.seed is None else trace.seed[:n])


def _scaled(trace, time_scale: float):
    """The trace as the load generator sends it: from 0, arrival times x time_scale."""
    arrivals = (trace.arrival_s - trace.arrival_s[0]) * time_scale
    return replace(trace, arrival_s=arrivals)
