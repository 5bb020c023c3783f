"""Metrics from per-query records: the run summary, the per-window time series, and their files.

Pure (no SimPy, no torch): the simulator (``diffsim simulate``) and real runs against a server
(``diffsim load``) hand the same :class:`~diffsim.query.Query` records and applied plans to these
functions, so both report the same numbers the same way.

Definitions
-----------
* Every query is counted exactly once, by its outcome: ``completed`` (``late`` when after its SLO),
  ``dropped``, ``failed``, ``rejected``, or ``unfinished`` (no outcome yet: a real run cut short).
* An SLO **violation** is a late completion or any non-completion; the violation ratio is
  violations / requests.
* **FID** of the served mix: when the plans route in ``cascade`` mode the discriminator picks which
  queries stay light, so the cascade's FID curve is read at r = light-served fraction of the completed
  queries (``fid_source: cascade``); in ``split`` mode (Clipper, Proteus) the light share is a random
  mix, read from ``Cascade.random_mix_fid`` (``fid_source: random-mix``). When a run mixes both modes,
  the completed queries are split by the mode in force at their arrival and the two FIDs are weighted
  by count (``fid_source: mixed``).
* Latency percentiles are over completed queries (late ones included), numpy's linear interpolation.
* Time series windows of ``window_s`` start at 0 and cover the whole run (to the last arrival, end or
  plan). A query is assigned to the window of its **arrival** for arrivals, violations, late and drops
  (so the per-window violation ratio is that of the load arriving then, and windows sum to the
  summary), and to the window of its **finish** for completions, throughput, light fraction and FID
  (the mix actually served then). Plan fields are those of the last plan applied by the window's end;
  the demand estimate is the mean of the controller's samples taken inside the window.

Output files are deterministic: floats are rounded to :data:`DIGITS` decimals, JSON keys are sorted.
The one exception is ``wall_s`` in summary.json (the run's wall-clock time).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DiffsimError
from ..plan import Plan
from ..profiles import Cascade
from ..query import Query

DIGITS = 6  # decimals kept for floats in summary.json, timeseries.csv and queries.csv
OUTCOMES = ("completed", "dropped", "failed", "rejected")

SUMMARY_FILE = "summary.json"
TIMESERIES_FILE = "timeseries.csv"
QUERIES_FILE = "queries.csv"
PLANS_FILE = "plans.csv"
TIMELINE_FILE = "timeline.png"

TIMESERIES_COLUMNS = (
    "t_start_s",
    "t_end_s",
    "arrivals",
    "arrival_qps",
    "measured_qps",
    "demand_estimate_qps",
    "completions",
    "throughput_qps",
    "violations",
    "late",
    "dropped",
    "slo_violation_ratio",
    "mode",
    "threshold",
    "light_share",
    "light_workers",
    "heavy_workers",
    "light_batch_size",
    "heavy_batch_size",
    "plan_feasible",
    "light_served",
    "light_fraction",
    "fid",
)

QUERY_COLUMNS = (
    "id",
    "prompt_id",
    "arrival_s",
    "outcome",
    "late",
    "finished_s",
    "latency_s",
    "served_by",
    "deferred",
    "confidence",
    "stages",
    "batch_sizes",
    "queue_s",
    "service_s",
)

PLAN_COLUMNS = (
    "t_s",
    "mode",
    "feasible",
    "threshold",
    "light_share",
    "light_workers",
    "light_batch_size",
    "heavy_workers",
    "heavy_batch_size",
    "demand_qps",
    "deferral_fraction",
    "expected_fid",
    "predicted_latency_s",
    "reason",
)

PlanTimeline = Sequence[tuple[float, Plan]]


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(
    queries: Sequence[Query],
    plans: PlanTimeline,
    *,
    cascade: Cascade,
    gpus: int,
    worker_busy_s: Sequence[float],
    duration_s: float,
    wall_s: float,
    policy: str = "",
    seed: Optional[int] = None,
    trace: str = "",
) -> dict:
    """The run's headline numbers (see the module docstring for the definitions)."""
    counts = {name: 0 for name in OUTCOMES}
    unfinished = late = violations = deferred = light_served = 0
    latencies: list[float] = []
    for q in queries:
        if q.outcome is None:
            unfinished += 1
        else:
            counts[q.outcome] += 1
        late += q.late
        violations += q.violation
        deferred += q.deferred
        if q.outcome == "completed":
            latencies.append(q.finished_s - q.arrival_s)
            light_served += q.served_by == "light"
    requests = len(queries)
    completed = counts["completed"]
    fid, fid_source = served_mix_fid([q for q in queries if q.outcome == "completed"], plans, cascade)
    lat = np.asarray(latencies, dtype=np.float64)
    busy = float(sum(worker_busy_s))
    return {
        "cascade": cascade.name,
        "gpu": cascade.gpu,
        "slo_s": cascade.slo_s,
        "policy": policy,
        "seed": seed,
        "trace": trace,
        "gpus": gpus,
        "requests": requests,
        "completed": completed,
        "on_time": completed - late,
        "late": late,
        "dropped": counts["dropped"],
        "failed": counts["failed"],
        "rejected": counts["rejected"],
        "unfinished": unfinished,
        "violations": violations,
        "slo_violation_ratio": _ratio(violations, requests),
        "mean_fid": fid,
        "fid_source": fid_source,
        "light_served": light_served,
        "light_fraction": _ratio(light_served, completed),
        "deferred": deferred,
        "deferral_fraction": _ratio(deferred, requests),
        "latency_mean_s": float(lat.mean()) if lat.size else None,
        "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_s": float(np.percentile(lat, 99)) if lat.size else None,
        "latency_max_s": float(lat.max()) if lat.size else None,
        "duration_s": duration_s,
        "throughput_qps": _ratio(completed, duration_s),
        "goodput_qps": _ratio(completed - late, duration_s),
        "worker_busy_s": busy,
        "gpu_utilization": _ratio(busy, gpus * duration_s),
        "plans_applied": len(plans),
        "plan_changes": plan_changes(plans),
        "infeasible_plans": sum(not p.feasible for _, p in plans),
        "threshold_mean": _time_weighted(plans, duration_s, lambda p: p.threshold),
        "light_workers_mean": _time_weighted(plans, duration_s, lambda p: p.light.workers),
        "heavy_workers_mean": _time_weighted(plans, duration_s, lambda p: p.heavy.workers),
        "wall_s": wall_s,
    }


def served_mix_fid(completed: Sequence[Query], plans: PlanTimeline, cascade: Cascade) -> tuple[Optional[float], str]:
    """FID of the images served to ``completed`` queries, and which curve it was read from."""
    if not completed:
        return None, "none"
    by_mode: dict[str, list[int]] = {"cascade": [0, 0], "split": [0, 0]}  # mode -> [light served, completed]
    times = [when for when, _ in plans]
    for q in completed:
        plan = plan_at(plans, q.arrival_s, times)
        mode = plan.mode if plan is not None else _guess_mode(q)
        by_mode[mode][1] += 1
        by_mode[mode][0] += q.served_by == "light"
    parts = []
    for mode, (light, n) in by_mode.items():
        if n:
            r = light / n
            parts.append((n, cascade.fid(r) if mode == "cascade" else cascade.random_mix_fid(r), mode))
    if len(parts) == 1:
        n, fid, mode = parts[0]
        return float(fid), "cascade" if mode == "cascade" else "random-mix"
    total = sum(n for n, _, _ in parts)
    return float(sum(n * fid for n, fid, _ in parts) / total), "mixed"


def _guess_mode(q: Query) -> str:
    # No plan known (a real run without plan records): a scored light image means cascade routing.
    return "cascade" if q.confidence is not None or q.deferred else "split"


def plan_at(plans: PlanTimeline, t: float, times: Optional[list[float]] = None) -> Optional[Plan]:
    """The plan in force at time ``t``: the last one applied at or before ``t`` (the first before any).

    ``times`` (the plans' times, precomputed) saves rebuilding the list on every call.
    """
    if not plans:
        return None
    i = bisect.bisect_right(times if times is not None else [when for when, _ in plans], t)
    return plans[max(i - 1, 0)][1]


def _plan_key(p: Plan) -> tuple:
    return (p.mode, p.light.workers, p.heavy.workers, p.light.batch_size, p.heavy.batch_size, p.threshold, p.light_share)


def plan_changes(plans: PlanTimeline) -> int:
    """How many applied plans changed workers, batch sizes, threshold or routing from the one before."""
    keys = [_plan_key(p) for _, p in plans]
    return sum(a != b for a, b in zip(keys, keys[1:]))


def _time_weighted(plans: PlanTimeline, end_s: float, value) -> Optional[float]:
    """Mean of ``value(plan)`` over [first plan, end_s], each plan weighted by how long it was in force."""
    if not plans:
        return None
    start = plans[0][0]
    if end_s <= start:
        return float(value(plans[-1][1]))
    total = 0.0
    for i, (t, p) in enumerate(plans):
        t_next = plans[i + 1][0] if i + 1 < len(plans) else end_s
        total += value(p) * max(0.0, min(t_next, end_s) - min(t, end_s))
    return total / (end_s - start)


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 else None


# ----------------------------------------------------------------------------------------------
# Time series


def run_end_s(queries: Sequence[Query], plans: PlanTimeline, demand: Sequence[tuple[float, float, float]]) -> float:
    """The last moment anything happened: an arrival, an end, a plan or a demand sample."""
    end = 0.0
    for q in queries:
        end = max(end, q.arrival_s, q.finished_s or 0.0)
    if plans:
        end = max(end, plans[-1][0])
    if demand:
        end = max(end, max(t for t, _, _ in demand))
    return end


def timeseries(
    queries: Sequence[Query],
    plans: PlanTimeline,
    demand: Sequence[tuple[float, float, float]],
    *,
    cascade: Cascade,
    window_s: float = 10.0,
) -> list[dict]:
    """One row per ``window_s`` window from 0 to the end of the run (see the module docstring)."""
    if not window_s > 0:
        raise DiffsimError(f"window_s must be > 0, got {window_s}")
    end = run_end_s(queries, plans, demand)
    n = max(1, math.ceil(end / window_s))  # an end exactly on a boundary falls in the last window

    def window(t: float) -> int:
        return min(n - 1, max(0, int(t // window_s)))

    arrivals = [0] * n
    violations = [0] * n
    late = [0] * n
    dropped = [0] * n
    completions = [0] * n
    light_served = [0] * n
    for q in queries:
        a = window(q.arrival_s)
        arrivals[a] += 1
        violations[a] += q.violation
        late[a] += q.late
        dropped[a] += q.outcome == "dropped"
        if q.outcome == "completed":
            f = window(q.finished_s)
            completions[f] += 1
            light_served[f] += q.served_by == "light"
    measured: list[list[float]] = [[] for _ in range(n)]
    estimate: list[list[float]] = [[] for _ in range(n)]
    for t, rate, est in demand:
        w = window(t)
        measured[w].append(rate)
        estimate[w].append(est)

    rows = []
    for w in range(n):
        t0, t1 = w * window_s, (w + 1) * window_s
        plan = plan_at(plans, t1) if plans and plans[0][0] <= t1 else None
        mode = plan.mode if plan is not None else ""
        r = _ratio(light_served[w], completions[w])
        if r is None:
            fid = None
        elif mode == "split":
            fid = float(cascade.random_mix_fid(r))
        else:
            fid = float(cascade.fid(r))
        rows.append(
            {
                "t_start_s": t0,
                "t_end_s": t1,
                "arrivals": arrivals[w],
                "arrival_qps": arrivals[w] / window_s,
                "measured_qps": _mean(measured[w]),
                "demand_estimate_qps": _mean(estimate[w]),
                "completions": completions[w],
                "throughput_qps": completions[w] / window_s,
                "violations": violations[w],
                "late": late[w],
                "dropped": dropped[w],
                "slo_violation_ratio": _ratio(violations[w], arrivals[w]),
                "mode": mode,
                "threshold": plan.threshold if plan else None,
                "light_share": plan.light_share if plan else None,
                "light_workers": plan.light.workers if plan else None,
                "heavy_workers": plan.heavy.workers if plan else None,
                "light_batch_size": plan.light.batch_size if plan else None,
                "heavy_batch_size": plan.heavy.batch_size if plan else None,
                "plan_feasible": plan.feasible if plan else None,
                "light_served": light_served[w],
                "light_fraction": r,
                "fid": fid,
            }
        )
    return rows


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------
# Per-query and per-plan rows


def query_rows(queries: Iterable[Query]) -> list[dict]:
    """One row per query, for queries.csv."""
    rows = []
    for q in queries:
        rows.append(
            {
                "id": q.id,
                "prompt_id": q.prompt_id,
                "arrival_s": q.arrival_s,
                "outcome": q.outcome or "unfinished",
                "late": q.late,
                "finished_s": q.finished_s,
                "latency_s": q.latency_s,
                "served_by": q.served_by or "",
                "deferred": q.deferred,
                "confidence": q.confidence,
                "stages": "+".join(q.stages),
                "batch_sizes": "+".join(str(b) for b in q.batch_sizes),
                "queue_s": q.queue_s,
                "service_s": q.service_s,
            }
        )
    return rows


def plan_rows(plans: Iterable[tuple[float, Plan]]) -> list[dict]:
    """One row per applied plan, for plans.csv (the solver's wall time is left out: it would make the
    file unstable)."""
    return [
        {
            "t_s": t,
            "mode": p.mode,
            "feasible": p.feasible,
            "threshold": p.threshold,
            "light_share": p.light_share,
            "light_workers": p.light.workers,
            "light_batch_size": p.light.batch_size,
            "heavy_workers": p.heavy.workers,
            "heavy_batch_size": p.heavy.batch_size,
            "demand_qps": p.demand_qps,
            "deferral_fraction": p.deferral_fraction,
            "expected_fid": p.expected_fid,
            "predicted_latency_s": p.predicted_latency_s,
            "reason": p.reason,
        }
        for t, p in plans
    ]


# ----------------------------------------------------------------------------------------------
# Files


def rounded(value):
    """``value`` with every float rounded to :data:`DIGITS` decimals (recursively); NaN/inf become None."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return None
        v = round(v, DIGITS)
        return 0.0 if v == 0 else v  # no "-0.0"
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def _cell(value) -> str:
    value = rounded(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def dump_json(path: Path | str, data) -> None:
    Path(path).write_text(json.dumps(rounded(data), sort_keys=True, indent=2) + "\n")


def write_csv(path: Path | str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A CSV with a fixed column order; None is an empty cell, booleans are true/false."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


def write_outputs(out_dir: Path | str, summary: dict, rows: Sequence[dict], *, plot: bool = True) -> list[Path]:
    """Write summary.json, timeseries.csv and (unless ``plot`` is False) timeline.png; return the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffsimError(f"{out}: cannot create the output folder: {e.strerror or e}") from None
    written = [out / SUMMARY_FILE, out / TIMESERIES_FILE]
    dump_json(written[0], summary)
    write_csv(written[1], rows, TIMESERIES_COLUMNS)
    if plot:
        from .plot import plot_timeline  # matplotlib only when a plot is wanted

        written.append(out / TIMELINE_FILE)
        plot_timeline(rows, summary, written[-1])
    return written
