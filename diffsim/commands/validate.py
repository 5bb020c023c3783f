"""``diffsim validate``: how far the simulator predicts a running server, measured.

1. Reads the server's own description (``GET /v1/config``): its cascade's curves, the latency profile its
   allocator plans with, and every run setting (policy, workers, routing, SLO, batch sizes, controller,
   admission, deadline sweep).
2. Replays the trace against it ``--repeats`` times with ``diffsim load`` (open loop), to measure the real
   system and its own run-to-run spread; each run's reports go to ``OUT/real-K/``, and what simulating
   the runs takes besides (the trace as sent, ``OUT/trace.csv``; the server's description,
   ``OUT/server.json``; its state at each run's start, ``OUT/real-runs.json``) beside them.
3. Simulates the same trace once per real run, each as that run went (into ``OUT/sim-K/``):

   * from the server's state at the run's start: its controller's (the plan in force, the re-plan
     phase, the demand samples and the delay sums, which ``GET /v1/plan`` reports), taken up at the
     server's tick phase; for a server that does not report it, an idle one is reproduced by an idle
     lead-in (an empty demand estimate, its re-plan phase) and a busy one from its demand estimate;
   * with the batch times the run itself measured: each answer carries its
     batch's run time, so the run's batches are rebuilt from them, and the profile's p50 per stage and
     batch size is scaled by their measured / profile p50, p95 and p99 (the stage's, for a batch size
     with fewer than 20 batches of its own; a stage with too few rebuilt batches, e.g. a
     heavy stage whose queries were all deferred, is scaled by the server's mean ratio over that run's
     batches, from ``GET /v1/plan`` and ``GET /metrics`` before and after it; ``--no-calibrate`` keeps
     the profile as it is); batch times are drawn around
     p50 by p95 / p99 with ``--service-time sampled`` (the default), correlated from one batch to the
     next as the run's were (slow spells of a shared host: the profile's batch_time_correlation), and
     scaled by the host's state at each batch's start as the run's were: the workers running at once,
     and for a batch that runs alone how long the host had been idle (batch_time_contention,
     :func:`measured_contention`);
   * with the run's request overhead (client latency minus the server's own time for the request: p50,
     p95 and p99, each request's drawn from a log-normal fitted to them with ``--service-time sampled``);
   * with the per-prompt confidences the server reported and every setting it described (admission and
     deadline sweep included); its allocator plans with the server's profile, as the server's does;
   * from the batch-time estimate the server held at the run's start (it carries over from run to run:
     admission promises on it), in the calibrated profile's units.
   Each run is simulated with ``--sim-seeds`` seeds (default 3) and its figures are their mean; the
   first seed's outputs are written (summary, time series, queries.csv and plans.csv, as the real run's).
4. Writes ``OUT/validation.json`` (per figure: sim -- the mean over the simulated runs --, each simulated
   and each real value, the error, the real spread, within_spread; per run its calibration and, request
   by request, how simulated and real outcomes pair up), ``OUT/server.json`` (what the server described),
   prints the table, and plots latency CDFs and violations per window (``OUT/validation.png``).

The simulations are made from those saved files, so ``diffsim validate --replay DIR --out OUT2``, with no
server, simulates the same real runs again: the same report, or the effect of a change to the simulator
measured against the very runs it was measured against before (the real system's noise is then out of
the comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

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
    p.add_argument("--url", type=nonempty, help="the running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", type=nonempty, metavar="FILE", help="trace CSV, a path or a shipped name (with --url)")
    p.add_argument("--replay", type=nonempty, metavar="DIR",
                   help="no server: simulate again the real runs an earlier validate saved in DIR (e.g. after a "
                        "change to the simulator, against the same real runs) and write the report to --out; the "
                        "real-run options (--repeats, --max-requests, --time-scale, --pause-s, --api-key) do not apply")
    p.add_argument("--out", required=True, type=nonempty, metavar="DIR", help="output folder")
    p.add_argument("--repeats", type=limits.REPEATS, default=3, metavar="K",
                   help=bounded("real runs of the trace", limits.REPEATS, 3))
    p.add_argument("--max-requests", type=limits.COUNT, metavar="N",
                   help=bounded("send only the first N requests of the trace", limits.COUNT))
    p.add_argument("--time-scale", type=limits.TIME_SCALE, default=1.0,
                   help=bounded("multiply arrival times", limits.TIME_SCALE, 1))
    p.add_argument("--service-time", choices=("p50", "sampled"), default="sampled",
                   help="the simulator's batch times (default sampled: around the profile's p50 by its p95/p99)")
    p.add_argument("--sim-seeds", type=limits.REPEATS, default=3, metavar="N",
                   help=bounded("simulations of each real run, with seeds seed .. seed + N - 1: its simulated "
                                "figures are their mean (slow spells make one simulation noisy)", limits.REPEATS, 3))
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


def sim_config_from(described: dict, *, service_time: str, overhead=None, ratio=None, spread=None,
                    correlation=None, contention=None):
    """The :class:`~diffsim.config.SimConfig` of a simulation of the described server: its profile's
    batch times as one run measured them (``spread``, see :func:`calibrated_profile`), or scaled by
    ``ratio`` per stage (:func:`scaled_profile`); its request overhead replaced by ``overhead``, the
    ``overheads`` fields of :func:`request_overhead_ms`; its ``batch_time_correlation`` set to
    ``correlation`` (:func:`measured_correlation`) and its ``batch_time_contention`` to ``contention``
    (:func:`measured_contention`) where given."""
    from ..config import ControllerConfig, SimConfig
    from ..profiles import CascadesFile, GpuProfile, build_cascade

    c = described["cascade"]
    profile_data = dict(described["profile"])
    if spread:
        profile_data = calibrated_profile(profile_data, c["light"], c["heavy"], spread, ratio or {})
    elif ratio:
        profile_data = scaled_profile(profile_data, c["light"], c["heavy"], ratio)
    if correlation:
        profile_data["batch_time_correlation"] = {"share": correlation["share"], "rho": correlation["rho"]}
    if contention:
        profile_data["batch_time_contention"] = contention_fields(contention)
    if overhead is not None:
        kept = {k: v for k, v in profile_data.get("overheads", {}).items() if not k.startswith("request_")}
        profile_data["overheads"] = {**kept, **overhead}
    # the server being validated is warm: its workers' first batches were taken before the runs
    profile_data["overheads"] = {**profile_data.get("overheads", {}), "cold_start_s": 0.0}
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
        # a server from before the stabilisation window (no such key) planned without one
        controller=ControllerConfig(**{"stabilization_s": 0.0, **run["controller"]}), routing=run["routing"],
        drop_factor=float(run["drop_factor"]), batch_timeout_s=float(run["batch_timeout_s"]),
        swap_s=float(run["swap_s"]), batch_sizes=tuple(run["batch_sizes"]),
        static_plan=dict(static_plan) if static_plan else None, max_utilization=float(run["max_utilization"]),
        batch_wait=float(run["batch_wait"]), admission=bool(run["admission"]),
        deadline_sweep_s=float(run["deadline_sweep_s"]), service_time=service_time,
        queue_model=run.get("queue_model"), tail_quantile=float(run.get("tail_quantile", 0.99)),
        fallback=run.get("fallback", "none"),  # a server from before the light fallback had none
    )


def batch_time_stats(url: str, api_key=None) -> dict:
    """Per stage, ``(mean of measured / profile batch time, batches measured)`` since the server started:
    the mean from ``GET /v1/plan``, the count from ``GET /metrics`` (``diffsim_batch_seconds_count``, the
    batches that ended without an error: those the mean is over); the count is None where /metrics does
    not answer. Empty when /v1/plan does not answer."""
    import re

    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        snap = httpx.get(f"{base}/v1/plan", headers=headers, timeout=10.0).json()
    except (httpx.HTTPError, ValueError):
        return {}
    counts: dict[str, float] = {}
    try:
        r = httpx.get(f"{base}/metrics", headers=headers, timeout=10.0)
        if r.status_code == 200:
            for role, n in re.findall(r'^diffsim_batch_seconds_count\{stage="(\w+)"\} (\S+)$', r.text, re.M):
                counts[role] = float(n)
    except httpx.HTTPError:
        pass
    return {role: (m, counts.get(role)) for role, m in (snap.get("service_time_ratio") or {}).items()
            if m is not None}


def run_ratio(before: dict, after: dict) -> dict:
    """Per stage, the mean measured / profile batch time over the batches between two
    :func:`batch_time_stats` (one run's): ``(m1 n1 - m0 n0) / (n1 - n0)``; where the counts are unknown,
    the mean since the server started (``after``'s). Stages without a batch in between are left out."""
    out = {}
    for role, (m1, n1) in after.items():
        m0, n0 = before.get(role, (0.0, 0.0))
        if n1 is None or n0 is None:
            out[role] = m1
        elif n1 > n0:
            out[role] = (m1 * n1 - (m0 or 0.0) * n0) / (n1 - n0)
    return out


def request_overhead_ms(runs) -> dict:
    """The request overhead's percentiles (ms) over every request answered 200 in ``runs`` (lists of
    queries), as the profile's
    ``overheads`` takes them: ``request_ms`` (p50), ``request_p95_ms``, ``request_p99_ms`` of client
    latency minus the server's own time for the request (its queueing and batches). All 0 without answers."""
    import numpy as np

    gaps = [1e3 * (q.latency_s - q.queue_s - q.service_s) for queries in runs for q in queries
            if q.outcome == "completed" and q.latency_s is not None]
    if not gaps:
        return {"request_ms": 0.0, "request_p95_ms": 0.0, "request_p99_ms": 0.0}
    p50, p95, p99 = (round(float(v), 3) for v in np.percentile(np.maximum(gaps, 0.0), [50, 95, 99]))
    return {"request_ms": p50, "request_p95_ms": p95, "request_p99_ms": p99}


BATCH_WINDOW_S = 2.0  # batch-mates' (arrival + queueing) on the client's clock lie this close at most
MIN_BATCHES = 20  # a stage's measured spread, and a host state's factor, is fitted from this many rebuilt batches on


def rebuilt_batches(queries, cascade) -> dict:
    """The batches a run's answers reveal, per stage: ``{role: [(size, run_s, profile_s, start_s), ...]}``
    in start order (``start_s``: the first batch-mate's arrival + queueing, on the client's clock).

    Each answer carries the run time of the batch it ran in (``run_ms``): batch-mates share it to the
    microsecond, so the completed queries served in one stage (deferred ones ran in two batches and are
    left out) are grouped by it, among those that started (arrival + queueing) within
    :data:`BATCH_WINDOW_S` of each other. ``profile_s`` is the profile's p50 for that batch (with the
    discriminator when the image was scored). Sizes the profile has no time for are left out."""
    from ..runtime.batching import service_time_s

    groups: dict[tuple[str, bool, float], list[float]] = {}
    for q in queries:
        if q.outcome != "completed" or q.deferred or not q.service_s or q.served_by not in ("light", "heavy"):
            continue
        key = (q.served_by, q.served_by == "light" and q.confidence is not None, round(q.service_s, 6))
        groups.setdefault(key, []).append(q.arrival_s + q.queue_s)
    out: dict[str, list] = {"light": [], "heavy": []}
    for (role, scored, run_s), starts in groups.items():
        starts.sort()
        batches = [[0, starts[0]]]
        for t in starts:
            if t - batches[-1][1] > BATCH_WINDOW_S:
                batches.append([0, t])
            batches[-1][0] += 1
        for n, start in batches:
            try:
                out[role].append((n, run_s, service_time_s(cascade, role, n, scored), start))
            except DiffsimError:
                continue
    for batches in out.values():
        batches.sort(key=lambda b: b[3])
    return out


IDLE_GAPS_S = (0.0, 0.005, 0.02, 0.1, 0.5)  # idle-time classes of a batch that runs alone (lower edges)
CONTENTION_FIELDS = ("factors", "idle_gaps_s", "idle_factors")  # as the profile has them


def batch_contention(batches: dict, gpus: int) -> dict:
    """Per rebuilt batch (``batches`` as :func:`rebuilt_batches` gives them; keyed ``(role, index)``),
    ``(running, idle_s)``: how many workers were running batches when it started, itself included (its
    run overlaps counted on the client's clock, at most ``gpus``), and, when it ran alone, how long
    before its start the last batch had ended (the host's idle time; 0 otherwise, inf for the first
    batch). Batches that start at the same instant count each other, where the simulator, starting them
    in turn, counts the first alone: on a real client's clock (microseconds) starts do not tie."""
    import math

    import numpy as np

    starts = np.array(sorted(b[3] for bs in batches.values() for b in bs))
    ends = np.array(sorted(b[3] + b[1] for bs in batches.values() for b in bs))
    out = {}
    for role, bs in batches.items():
        for i, (_, _, _, start) in enumerate(bs):
            ended = int(np.searchsorted(ends, start, side="right"))
            # itself included; more than gpus where runs overlap on the client's clock
            running = int(np.searchsorted(starts, start, side="right")) - ended
            idle_s = (float(start - ends[ended - 1]) if ended else math.inf) if running <= 1 else 0.0
            out[(role, i)] = (min(max(running, 1), gpus), idle_s)
    return out


def measured_contention(batches: dict, gpus: int) -> Optional[dict]:
    """How one run's batch times (its :func:`rebuilt_batches`) depended on the host's state at their start (the profile's
    ``batch_time_contention``): ``log(measured / profile)`` per rebuilt batch fitted as an effect of its
    stage and batch size plus an effect of its start state (:func:`batch_contention`) -- the number of
    workers running, and for a batch that ran alone the class of the host's idle time before it
    (:data:`IDLE_GAPS_S`) -- by Tukey's median polish (batch size and state go together: batches grow
    when every worker is busy). States with fewer than :data:`MIN_BATCHES` batches take the nearest
    count's factor below, else above (an idle class, the alone count's), and their batches inform no
    batch-size effect; the factors are the exponentials of the state effects. :func:`measured_spread`
    and :func:`measured_correlation` then take the batches' times divided by their factors
    (:func:`decontended`), so that the
    simulator's draws, times the factor of the state, have the run's distribution. None where fewer
    than two states have enough batches (nothing to tell apart)."""
    import math

    import numpy as np

    state_of = batch_contention(batches, gpus)
    logs, group, states = [], [], []
    for role, bs in batches.items():
        for i, (n, run_s, profile_s, _) in enumerate(bs):
            logs.append(math.log(run_s / profile_s))
            group.append((role, n))
            states.append(_state(*state_of[(role, i)]))
    logs = np.array(logs)
    counts = np.array([k for k, _ in states])
    names = sorted(set(states), key=lambda st: (st[0], -1 if st[1] is None else st[1]))
    s_index = np.array([names.index(st) for st in states])
    enough = [j for j, st in enumerate(names) if (s_index == j).sum() >= MIN_BATCHES]
    if len(enough) < 2:
        return None
    groups = sorted(set(group))
    g_index = np.array([groups.index(g) for g in group])
    size_effect, state_effect = np.zeros(len(groups)), np.zeros(len(names))
    fitted_state = np.isin(s_index, enough)  # a sparse state's batches (no effect of their own) inform no size
    for _ in range(20):
        for j in range(len(groups)):
            in_group = g_index == j
            use = in_group & fitted_state if (in_group & fitted_state).any() else in_group
            size_effect[j] = np.median((logs - state_effect[s_index])[use])
        for j in enough:
            state_effect[j] = np.median((logs - size_effect[g_index])[s_index == j])
    alone = counts == 1
    levels = sorted({k for k in range(2, gpus + 1) if (counts == k).sum() >= MIN_BATCHES}
                    | ({1} if alone.sum() >= MIN_BATCHES else set()))

    def level_effect(k: int) -> float:
        """The effect of k workers running (k = 1: the alone batches together, whatever their idle time)."""
        if k == 1:
            return float(np.median((logs - size_effect[g_index])[alone]))
        return float(state_effect[names.index((k, None))])

    nearest = [max([j for j in levels if j <= k] or [min(levels)]) for k in range(1, max(levels) + 1)]
    effects = {k: level_effect(k) for k in set(nearest)}
    out = {"factors": [round(math.exp(effects[k]), 4) for k in nearest],
           "batches": {k: int((counts == k).sum()) for k in levels}}
    if 1 in levels:
        idle = [names.index((1, c)) if (1, c) in names else None for c in range(len(IDLE_GAPS_S))]
        fitted = [j if j is not None and j in enough else None for j in idle]
        if sum(j is not None for j in fitted) >= 2:
            out["idle_gaps_s"] = list(IDLE_GAPS_S)
            out["idle_factors"] = [round(math.exp(state_effect[j] if j is not None else effects[1]), 4) for j in fitted]
            out["idle_batches"] = [int((s_index == j).sum()) if j is not None else 0 for j in idle]
    return out


def _state(running: int, idle_s: float) -> tuple[int, Optional[int]]:
    """A batch's start state for the fit: ``(running, None)``, or ``(1, idle class)`` when it ran alone."""
    from ..profiles import idle_class

    if running > 1:
        return running, None
    return 1, idle_class(IDLE_GAPS_S, idle_s)


def contention_fields(contention: dict) -> dict:
    """The profile's ``batch_time_contention`` of a :func:`measured_contention` result (its fitted fields,
    without the batch counts)."""
    return {k: list(contention[k]) for k in CONTENTION_FIELDS if contention.get(k)}


def decontended(batches: dict, contention: Optional[dict], gpus: int) -> dict:
    """``batches`` (:func:`rebuilt_batches`) with each batch's run time divided by its factor in the
    run's :func:`measured_contention` (unchanged without one)."""
    if not contention:
        return batches
    from ..profiles import BatchTimeContention

    model = BatchTimeContention(**contention_fields(contention))
    running = batch_contention(batches, gpus)
    return {role: [(n, run_s / model.at(*running[(role, i)]), profile_s, start)
                   for i, (n, run_s, profile_s, start) in enumerate(bs)] for role, bs in batches.items()}


def measured_spread(batches: dict) -> dict:
    """Per stage, the p50 / p95 / p99 of measured over profile batch time in one run (its
    :func:`rebuilt_batches`, :func:`decontended` where the run has a contention fit), with the number of batches, and the same per batch size under ``"sizes"``
    for the sizes with at least :data:`MIN_BATCHES` batches of their own (on a loaded host a profile's
    shape across batch sizes can itself be off). A stage with fewer than :data:`MIN_BATCHES` batches is
    left out."""
    import numpy as np

    def percentiles(ratios) -> dict:
        p50, p95, p99 = (round(float(v), 4) for v in np.percentile(ratios, [50, 95, 99]))
        return {"p50": p50, "p95": p95, "p99": p99, "batches": len(ratios)}

    spread = {}
    for role, stage in batches.items():
        if len(stage) < MIN_BATCHES:
            continue
        by_size: dict[int, list] = {}
        for n, run_s, profile_s, _ in stage:
            by_size.setdefault(n, []).append(run_s / profile_s)
        spread[role] = {**percentiles([r for ratios in by_size.values() for r in ratios]),
                        "sizes": {n: percentiles(ratios) for n, ratios in sorted(by_size.items())
                                  if len(ratios) >= MIN_BATCHES}}
    return spread


MIN_CORRELATED_BATCHES = 60  # the correlation of batch times is fitted from this many rebuilt batches on
CORRELATION_LAGS = 15  # over lags 1 .. this many batches


def measured_correlation(batches: dict) -> Optional[dict]:
    """How one run's batch times hung together in time (the profile's ``batch_time_correlation``): its
    rebuilt batches (:func:`rebuilt_batches`, :func:`decontended` as for :func:`measured_spread`) of both
    stages in start order, each one's log(measured / profile) standardised per
    stage and batch size; their autocorrelation at lag k fitted as ``share x rho^k`` (least squares on
    its log over the lags 1 .. :data:`CORRELATION_LAGS` where it is positive). None with fewer than
    :data:`MIN_CORRELATED_BATCHES` batches; share 0 where no lag is correlated."""
    import math

    import numpy as np

    merged = []
    for stage in batches.values():
        by_size: dict[int, list] = {}
        for n, run_s, profile_s, start in stage:
            by_size.setdefault(n, []).append((start, math.log(run_s / profile_s)))
        for group in by_size.values():  # per batch size: the profile's shape across sizes may be off,
            if len(group) < 2:          # and sizes follow the load, which would read as slow spells
                continue
            z = np.array([v for _, v in group])
            z = (z - z.mean()) / (z.std() or 1.0)
            merged += [(start, v) for (start, _), v in zip(group, z)]
    if len(merged) < MIN_CORRELATED_BATCHES:
        return None
    merged.sort()
    z = np.array([v for _, v in merged])
    lags = np.arange(1, CORRELATION_LAGS + 1)
    acf = np.array([np.corrcoef(z[:-k], z[k:])[0, 1] if z[k:].std() and z[:-k].std() else 0.0 for k in lags])
    keep = acf > 0.02
    if keep.sum() < 3:
        return {"share": 0.0, "rho": 0.0, "batches": len(z)}
    slope, intercept = np.polyfit(lags[keep], np.log(acf[keep]), 1)
    return {"share": round(float(np.clip(np.exp(intercept), 0.0, 1.0)), 4),
            "rho": round(float(np.clip(np.exp(slope), 0.0, 0.99)), 4), "batches": len(z)}


def calibrated_profile(profile: dict, light_model: str, heavy_model: str, spread: dict, ratio: dict) -> dict:
    """``profile`` (as /v1/config gives it) with each stage's batch times as one run measured them: where
    ``spread`` has the stage (:func:`measured_spread`), each of the profile's batch sizes has its p50 / p95 /
    p99 made the profile's p50 times that size's measured ratios, or the stage's where the size had too few
    batches of its own (sizes between the profile's are interpolated, as the profile's own are)
    (the light model's and the discriminator's alike); otherwise the stage is scaled by ``ratio`` as in
    :func:`scaled_profile`."""
    def measured(table: dict, r: dict) -> dict:
        out = dict(table)
        sizes = r.get("sizes") or {}
        base = table["p50_ms"]
        for key, q in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
            out[key] = [None if v is None else round(v * sizes.get(n, r)[q], 3)
                        for n, v in zip(table["batch_sizes"], base)]
        return out

    data = scaled_profile(profile, light_model, heavy_model, {k: v for k, v in ratio.items() if k not in spread})
    models = dict(data["models"])
    if "light" in spread:
        models[light_model] = measured(profile["models"][light_model], spread["light"])
        data["discriminator"] = measured(profile["discriminator"], spread["light"])
    if "heavy" in spread:
        models[heavy_model] = measured(profile["models"][heavy_model], spread["heavy"])
    data["models"] = models
    return data


def lead_in_s(snapshot: dict, controller) -> float:
    """How long to simulate the server idle before the trace, so that the simulation starts as the real
    run did (``snapshot``: the server's ``GET /v1/plan`` at the run's start; 0 when it lacks the fields).

    The server's controller does not start afresh with each run: it has ticked since the server started,
    its demand estimate has decayed over the idle time before the run (to about 0 after ``ewma_window``
    idle ticks), the plan in force is the one made for that demand (on cpu-tiny: batch 1), and its next
    re-plan falls anywhere in the re-plan period -- which decides how long the first seconds of a run
    are served under that idle plan. The simulator's controller starts with ``initial_demand_qps`` and
    re-plans at its first tick. An idle lead-in of at least ``ewma_window + 1`` ticks empties its demand
    estimate, and its length is chosen so that the simulated ticks and re-plans fall at the run's times
    as the server's did (ticks every ``tick_s`` of the server's clock, re-plans every ``n`` ticks from
    the last one, ``applied_s``)."""
    import math

    try:
        now = float(snapshot["now_s"])
        applied = float(snapshot["applied_s"])
        ticks = int(snapshot["controller"]["ticks"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    tick = controller.tick_s
    period = max(1, math.ceil(controller.replan_s / tick - 0.5))  # ticks per re-plan (Controller.replan_due)
    next_replan = 1 if ticks == 0 else round(applied / tick) + period  # the server's tick index
    # Simulated time S is the server's S - lead + now: its ticks must fall on the server's (lead = now +
    # d x tick) and its re-plans (ticks 1, 1 + period, ...) on the server's (d = 1 - next_replan, mod period).
    lead = now + ((1 - next_replan) % period) * tick
    least = (controller.ewma_window + 1) * tick
    return least + (lead - least) % (period * tick)  # the shortest such lead of at least ``least``


def measured_confidences(runs, cascade, seed: int):
    """Per-prompt confidences the server reported in ``runs`` (lists of queries; light images are scored,
    whatever the request's status), falling back to the cascade's deferral curve for prompts never scored."""
    from ..runtime.confidence import Confidences

    conf = Confidences.from_curve(cascade.deferral, seed)
    known = {}
    for queries in runs:
        for q in queries:
            if q.confidence is not None:
                known.setdefault(q.prompt_id, float(q.confidence))
    conf.learn(known)
    return conf, len(known)


TRACE_FILE = "trace.csv"  # the trace as sent: from 0, arrival times x --time-scale
RUNS_FILE = "real-runs.json"  # what the real runs' own folders do not hold: each run's server state at its start
SERVER_FILE = "server.json"


def run(args: argparse.Namespace) -> int:
    if args.replay is not None:
        if args.url is not None or args.trace is not None:
            raise DiffsimError("validate: --replay re-simulates saved runs; give it without --url and --trace")
        return simulate_runs(Path(args.replay), Path(args.out), args)
    if args.url is None or args.trace is None:
        raise DiffsimError("validate: give --url and --trace (measure a running server), or --replay DIR")
    from ..resources import resolve_trace
    from ..workload.loadgen import run_load, write_results
    from ..workload.traces import read_trace, write_trace

    described = fetch_config(args.url, args.api_key)
    sim_config = sim_config_from(described, service_time=args.service_time)
    trace = read_trace(resolve_trace(args.trace))
    if args.max_requests is not None:
        trace = _head(trace, args.max_requests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SERVER_FILE).write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
    write_trace(_scaled(trace, args.time_scale), out / TRACE_FILE)
    starts = []
    for k in range(args.repeats):
        if k:
            import time

            time.sleep(args.pause_s)
        print(f"real run {k + 1}/{args.repeats}: {len(trace)} requests against {args.url}", flush=True)
        before = batch_time_stats(args.url, args.api_key)
        result = asyncio.run(run_load(args.url, trace, time_scale=args.time_scale, api_key=args.api_key))
        ratio = run_ratio(before, batch_time_stats(args.url, args.api_key))
        write_results(out / f"real-{k + 1}", result, sim_config.cascade, trace_name=args.trace,
                      window_s=args.window_s)
        starts.append({"server_start": result.server, "server_mean_ratio": ratio})
    (out / RUNS_FILE).write_text(json.dumps({"url": args.url, "trace": args.trace, "time_scale": args.time_scale,
                                             "runs": starts}, indent=2, sort_keys=True) + "\n")
    # The simulations are made from what was just written, as --replay makes them: one code path, and a
    # replay of this folder reproduces this report exactly.
    return simulate_runs(out, out, args)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffsimError(f"validate: {path}: no such file (a folder written by diffsim validate?)") from None
    except (OSError, ValueError) as e:
        raise DiffsimError(f"validate: {path}: cannot read it: {e}") from None


def read_real_queries(path: Path, slo_s: float) -> list:
    """The queries of a real run as its ``queries.csv`` has them (what validate compares and calibrates
    from: outcome, times, stages, confidence)."""
    import csv

    from ..query import Query

    def number(row, key):
        text = row[key]
        return float(text) if text else None

    queries = []
    try:
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    q = Query(int(row["id"]), int(row["prompt_id"]), float(row["arrival_s"]), slo_s)
                    q.outcome = None if row["outcome"] == "unfinished" else row["outcome"]
                    q.finished_s = number(row, "finished_s")
                    q.served_by = row["served_by"] or None
                    q.deferred = row["deferred"] == "true"
                    q.confidence = number(row, "confidence")
                    q.stages = row["stages"].split("+") if row["stages"] else []
                    q.batch_sizes = [int(b) for b in row["batch_sizes"].split("+")] if row["batch_sizes"] else []
                    q.queue_s = number(row, "queue_s") or 0.0
                    q.service_s = number(row, "service_s") or 0.0
                except (KeyError, TypeError, ValueError) as e:
                    raise DiffsimError(f"validate: {path}:{line}: not a queries.csv row ({e})") from None
                queries.append(q)
    except FileNotFoundError:
        raise DiffsimError(f"validate: {path}: no such file (a folder written by diffsim validate?)") from None
    return queries


def _read_rows(path: Path) -> list[dict]:
    """A time series as the plot reads it (window start and violations)."""
    import csv

    try:
        with open(path, newline="") as f:
            return [{"t_start_s": float(r["t_start_s"]), "violations": float(r["violations"])}
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []  # only the plot uses it


def simulate_runs(src: Path, out: Path, args: argparse.Namespace) -> int:
    """Simulate each real run saved in ``src`` (by a live validate: ``server.json``, ``trace.csv``,
    ``real-runs.json`` and ``real-K/``) and compare: write the simulations and the report to ``out``."""
    from ..policies import policy_for
    from ..reports import metrics
    from ..reports.comparison import summarize_result
    from ..reports.validation import compare, figures_of, format_table, mean_figures, outcome_pairs, plot
    from ..workload.traces import read_trace

    described = _read_json(src / SERVER_FILE)
    saved = _read_json(src / RUNS_FILE)
    try:
        sim_config = sim_config_from(described, service_time=args.service_time)
        starts = list(saved["runs"])
        trace_name = str(saved["trace"])
    except (KeyError, TypeError, ValueError) as e:
        raise DiffsimError(f"validate: {src}: {SERVER_FILE} / {RUNS_FILE} lack a field ({e})") from None
    if not starts or not all(isinstance(run, dict) for run in starts):
        raise DiffsimError(f"validate: {src / RUNS_FILE}: 'runs' must be a non-empty list of objects")
    cascade = sim_config.cascade
    trace = read_trace(src / TRACE_FILE)
    out.mkdir(parents=True, exist_ok=True)
    runs, real_figures, real_rows = [], [], []
    for k in range(len(starts)):
        folder = src / f"real-{k + 1}"
        queries = read_real_queries(folder / metrics.QUERIES_FILE, cascade.slo_s)
        if len(queries) != len(trace):
            raise DiffsimError(f"validate: {folder / metrics.QUERIES_FILE}: {len(queries)} queries for a "
                               f"trace of {len(trace)}")
        runs.append(queries)
        real_figures.append(figures_of(_read_json(folder / metrics.SUMMARY_FILE), queries))
        real_rows.append(_read_rows(folder / metrics.TIMESERIES_FILE))
    confidences, scored = measured_confidences(runs, cascade, sim_config.seed)
    sims, sim_figures, sim_rows, per_run = [], [], [], []
    gpus = sim_config.gpus
    for k, queries in enumerate(runs):
        overhead = request_overhead_ms([queries])
        contention, spread, correlation = None, {}, None
        if not args.no_calibrate:
            batches = rebuilt_batches(queries, cascade)
            contention = measured_contention(batches, gpus)
            batches = decontended(batches, contention, gpus)
            spread, correlation = measured_spread(batches), measured_correlation(batches)
        mean_ratio = {} if args.no_calibrate else dict(starts[k].get("server_mean_ratio") or {})
        config_k = sim_config_from(described, service_time=args.service_time, overhead=overhead, ratio=mean_ratio,
                                   spread=spread, correlation=correlation, contention=contention)
        # The server's allocator plans with the server's profile (its batch estimates are corrected by
        # measured times only for batching, drops and admission): so does the simulated one.
        policy = policy_for(sim_config)
        snapshot = starts[k].get("server_start") or {}
        try:
            config_k, lead, how, controller_state = start_state(config_k, trace, confidences, snapshot, policy)
            estimate = start_estimate(snapshot)
        except (KeyError, TypeError, ValueError) as e:
            raise DiffsimError(f"validate: {src / RUNS_FILE}: run {k + 1}: the server's state at its start cannot be "
                               f"taken up ({type(e).__name__}: {e})") from None
        replicas = []  # the run simulated with --sim-seeds seeds: its figures are their mean
        for j in range(args.sim_seeds):
            # batches at the times this run measured, judged (batching, drops, admission) by the server's
            # profile and its estimate at the run's start, as the server judged them
            sim_j = simulate_run(replace(config_k, seed=config_k.seed + j), trace, confidences, lead, policy,
                                 service_estimate=estimate, controller_state=controller_state,
                                 estimates_from=sim_config.cascade)
            summary = summarize_result(sim_j, trace_name)
            replicas.append(figures_of(summary, sim_j.queries))
            if j == 0:
                sim, sim_summary = sim_j, summary
        # the first seed's outputs are written and plotted
        rows = metrics.timeseries(sim.queries, sim.plans, sim.demand, cascade=config_k.cascade, window_s=args.window_s)
        metrics.write_outputs(out / f"sim-{k + 1}", sim_summary, rows, plot=False)
        metrics.write_csv(out / f"sim-{k + 1}" / metrics.QUERIES_FILE, metrics.query_rows(sim.queries),
                          metrics.QUERY_COLUMNS)
        metrics.write_csv(out / f"sim-{k + 1}" / metrics.PLANS_FILE, metrics.plan_rows(sim.plans), metrics.PLAN_COLUMNS)
        sims.append(sim)
        sim_figures.append(mean_figures(replicas))
        sim_rows.append(rows)
        per_run.append({"lead_in_s": round(lead, 3), "start": how, "request_overhead_ms": overhead,
                        "batch_time_ratio": spread, "batch_time_correlation": correlation,
                        "batch_time_contention": contention,
                        "scaled_by_server_mean": {r: v for r, v in mean_ratio.items() if r not in spread},
                        "server_mean_ratio": mean_ratio, "start_estimate": estimate,
                        "start_controller": controller_state,
                        "outcomes": outcome_pairs(sim.queries, queries)})
    comparison = compare(mean_figures(sim_figures), real_figures, sim_runs=sim_figures)
    report = {
        "url": saved.get("url"), "trace": trace_name, "requests": len(trace), "repeats": len(runs),
        "service_time": args.service_time, "sim_seeds": args.sim_seeds, "calibrated": not args.no_calibrate,
        "window_s": args.window_s, "prompts_scored": scored, "runs": per_run,
        "server": {"cascade": described["cascade"]["name"], "policy": described["run"]["policy"],
                   "gpus": described["run"]["gpus"], "routing": described["run"]["routing"],
                   "slo_s": described["cascade"]["slo_s"]},
        "figures": comparison,
    }
    if src != out:
        report["replayed_from"] = str(src)
    (out / "validation.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot(out / "validation.png", [s.queries for s in sims], runs, sim_rows, real_rows)
    print(format_table(comparison))
    for k, run_k in enumerate(per_run):
        light = run_k["batch_time_ratio"].get("light")
        speed = (f"light batches x{light['p50']:.2f} (p95 x{light['p95']:.2f}, p99 x{light['p99']:.2f}) of the "
                 f"profile over {light['batches']}" if light else "profile scaled by the server's mean ratio in the run")
        o = run_k["request_overhead_ms"]
        c = run_k["batch_time_correlation"]
        spells = f"slow spells: share {c['share']:.2f}, rho {c['rho']:.2f}; " if c else ""
        start = run_k["start"] + (f", lead-in {run_k['lead_in_s']:.2f} s" if run_k["lead_in_s"] else "")
        print(f"run {k + 1}: simulated from its start state ({start}); {speed}; "
              f"{spells}request overhead p50 {o['request_ms']:.0f} ms, p99 {o['request_p99_ms']:.0f} ms")
    print(f"wrote {out / 'validation.json'}, {out / 'validation.png'}")
    return 0


def _plan_key(plan) -> tuple:
    return (plan.mode, round(plan.threshold, 9), round(plan.light_share, 9), plan.light.workers,
            plan.light.batch_size, plan.heavy.workers, plan.heavy.batch_size)


def start_state(config, trace, confidences, snapshot: dict, policy=None):
    """How to start the simulation of a run as the server started it (``snapshot``: its ``GET /v1/plan`` at
    the run's start): ``(config, lead_s, how, controller_state)``.

    A server that reports its controller's state (``controller.state``: plan in force, re-plan phase,
    demand samples, delay sums, as its last tick left them at ``controller.state_at_s``) is taken up
    exactly: the simulation resumes that state at its time 0, the server's ``state_at_s``, and the run
    starts a lead-in of ``now_s - state_at_s`` later, so that the simulated ticks fall on the server's
    (every ``tick_s`` of its clock). For an older server that does not: one idle long enough before the run
    holds an empty demand estimate and the plan made for it, and the idle lead-in of :func:`lead_in_s`
    reproduces both, and its re-plan phase; one that was busy shortly before (the previous trace, a
    short pause) is started from its demand estimate, under the same plan, re-planning from the first
    tick on."""
    controller = snapshot.get("controller") or {}
    state = controller.get("state")
    if isinstance(state, dict) and state.get("plan"):
        try:
            phase = float(snapshot["now_s"]) - float(controller["state_at_s"])  # the run starts this long after
        except (KeyError, TypeError, ValueError) as e:  # the tick that left the state
            raise DiffsimError(f"the server's state at the run's start lacks a time ({type(e).__name__}: {e})") from None
        from ..runtime.controller import read_state

        read_state(state)  # a state a controller can take up, or ValueError
        return config, max(0.0, phase), "the server's controller state", state
    lead = lead_in_s(snapshot, config.controller)
    server_plan = snapshot.get("plan")
    if not lead or not server_plan:
        return config, lead, "idle lead-in" if lead else "fresh start", None
    from ..plan import Plan

    probe = simulate_run(config, replace(trace, arrival_s=trace.arrival_s[:1], prompt_id=trace.prompt_id[:1],
                                         prompt=None, seed=None), confidences, lead, policy)
    if _plan_key(probe.plans[0][1]) == _plan_key(Plan.from_dict(server_plan)):
        return config, lead, "idle lead-in", None
    demand = float((snapshot.get("controller") or {}).get("demand_qps") or 0.0) / config.controller.headroom
    controller = replace(config.controller, initial_demand_qps=demand)
    return replace(config, controller=controller), 0.0, "the server's plan and demand estimate", None


def start_estimate(snapshot: dict) -> Optional[dict]:
    """The batch-time estimate the server held at a run's start (``snapshot``: its ``GET /v1/plan`` then):
    per stage, its factor on the server's profile and the factor's mean deviation. It carries over from
    the server's earlier runs (a noisy run before leaves a wide deviation, and admission refuses more at
    the start of the next). None when the server did not report one (the simulation then starts from
    the profile)."""
    est = snapshot.get("service_time_estimate")
    if not isinstance(est, dict):
        return None
    try:
        out = {key: {role: float(est[key][role]) for role in ("light", "heavy")} for key in ("factor", "deviation")}
    except (KeyError, TypeError, ValueError):
        return None
    if not all(f > 0 for f in out["factor"].values()) or not all(d >= 0 for d in out["deviation"].values()):
        raise ValueError(f"a batch-time estimate with a factor <= 0 or a deviation < 0: {out}")
    return out


def simulate_run(config, trace, confidences, lead_s: float, policy=None, service_estimate=None,
                 controller_state=None, estimates_from=None):
    """The simulation of ``trace`` after ``lead_s`` of idle time (:func:`lead_in_s`), with every time of
    the result moved back by ``lead_s``: the run's t = 0 is the trace's first arrival, as on the client.
    ``policy``: the policy to plan with (default: the config's, on its own profile); ``service_estimate``:
    the batch-time estimate to start from (:func:`start_estimate`); ``controller_state``: the controller's
    (:func:`start_state`); ``estimates_from``: the profile batches are judged by (see
    :func:`~diffsim.simulator.simulate`)."""
    from ..simulator import simulate

    result = simulate(config, replace(trace, arrival_s=trace.arrival_s + lead_s), confidences=confidences,
                      policy=policy, service_estimate=service_estimate, controller_state=controller_state,
                      estimates_from=estimates_from)
    if not lead_s:
        return result
    for q in result.queries:
        q.arrival_s -= lead_s
        q.enqueued_s -= lead_s
        if q.finished_s is not None:
            q.finished_s -= lead_s
    in_force = [p for t, p in result.plans if t <= lead_s][-1]
    plans = [(0.0, in_force)] + [(t - lead_s, p) for t, p in result.plans if t > lead_s]
    demand = [(t - lead_s, rate, d) for t, rate, d in result.demand if t >= lead_s]
    return replace(result, plans=plans, demand=demand, duration_s=result.duration_s - lead_s)


def _head(trace, n: int):
    from ..workload.traces import Trace

    return Trace(arrival_s=trace.arrival_s[:n], prompt_id=trace.prompt_id[:n],
                 prompt=None if trace.prompt is None else trace.prompt[:n], source=trace.source,
                 seed=None if trace.seed is None else trace.seed[:n])


def _scaled(trace, time_scale: float):
    """The trace as the load generator sends it: from 0, arrival times x time_scale."""
    arrivals = (trace.arrival_s - trace.arrival_s[0]) * time_scale
    return replace(trace, arrival_s=arrivals)
