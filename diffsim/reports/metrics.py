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
* **FID** of a served mix: when the plans route in ``cascade`` mode the discriminator picks which
  queries stay light, so the cascade's FID curve is read at r = light-served fraction of the completed
  queries (``fid_source: cascade``); in ``split`` mode (Clipper, Proteus) the light share is a random
  mix, read from ``Cascade.random_mix_fid`` (``fid_source: random-mix``). When a mix holds both modes,
  its completed queries are split by the mode in force at their arrival and the two FIDs are weighted
  by count (``fid_source: mixed``).
* ``mean_fid`` is per window: the FID of each ``window_s`` window's served mix (completions by finish
  time, as in the time series), averaged with each window weighted by its completions. With a
  threshold that moves, the FID of the run's overall light fraction flatters a policy whose deferral
  swings (the curve is U-shaped: windows at r = 0.2 and 0.6 do not average to the FID at 0.4); that
  figure is kept as ``fid_overall_mix``. Both are equal when one window holds every completion.
* ``mean_fid_fallback_bound`` (only in runs with a light fallback, ``fallback: light``): ``mean_fid`` with
  each window's fallbacks (deferred queries answered with their light image) read for what they are.
  ``mean_fid`` reads the curve at the window's light fraction, as if the discriminator had picked every
  light image; a fallback's light image is one it deferred, one of the *least* confident. In a window of
  n completed cascade-mode queries, h served heavy and f fallbacks, the threshold in force deferred
  d = (h + f) / n, whose mix has FID fid(1 - d) on the curve (r: light fraction). Which deferred queries
  fall back depends on timing (queues, deadlines), not on their prompts, so the served images are the
  mixture (1 - w) x [the threshold's mix] + w x [all light] with w = f / (h + f): the deferred share's
  heavy images with a random w of them replaced by their light ones. The Frechet distance of such a
  mixture is at most the same mixture of the two distances (proof in :func:`fallback_mix_fid`), so the
  window reads fid(1 - d) + w x (fid(1) - fid(1 - d)): an upper bound on the FID of the mix served.
  With no fallback in a window it is ``mean_fid``'s reading exactly; on a convex curve (every shipped
  cascade's) it is never below it. Split-mode windows read as in ``mean_fid`` (nothing is deferred).
* ``slo_violation_window_mean`` is the DiffServe artifact's figure: the unweighted mean over windows
  with arrivals of each window's violation ratio (by arrival time); ``slo_violation_ratio`` counts per
  request. A quiet window weighs as much as a peak one in the former.
* Latency percentiles are over completed queries (late ones included), numpy's linear interpolation.
* Time series windows of ``window_s`` start at 0 and cover the whole run (to the last arrival, end or
  plan). A query is assigned to the window of its **arrival** for arrivals, violations, late and drops
  (so the per-window violation ratio is that of the load arriving then, and windows sum to the
  summary), and to the window of its **finish** for completions, throughput, light fraction and FID
  (the mix actually served then). Plan fields are those of the last plan applied by the window's end;
  the demand estimate is the mean of the controller's samples taken inside the window.

Output files are deterministic: floats are rounded to :data:`DIGITS` decimals, JSON keys are sorted.
The one exception is ``wall_s`` in summary.json (the run's wall-clock time).

Scale: the summary and the time series are computed from :class:`QueryRecords`, nine bytes a query
(finish time and a byte of flags; arrival times are the trace's own array), with numpy; a simulation of
millions of requests keeps these instead of its :class:`~diffsim.query.Query` objects, and writes
queries.csv as queries end (:class:`QueryCsv`, one direct formatter per row, the same bytes as the
``csv`` module would write).
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

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
# Compact per-query records

# QueryRecords.flags: the outcome's code in the low 3 bits, then one bit per property.
_OUTCOME_CODE = {None: 0, "completed": 1, "dropped": 2, "failed": 3, "rejected": 4}
_CODE_MASK = 7
_COMPLETED = 1
_DROPPED = 2
LATE = 8
DEFERRED = 16
SERVED_LIGHT = 32
SCORED = 64  # the light image has a confidence (tells cascade routing when no plan is known)


class QueryRecords:
    """What the summary and the time series need of each query: arrival and finish times (NaN: no
    outcome yet) and a byte of flags (outcome, late, deferred, served light, scored), in query order.

    Why: a :class:`~diffsim.query.Query` with its lists and floats takes about 0.6 KB; these take 9
    bytes beyond the arrival times, which can be the trace's own array. A simulation of 10M requests
    holds these, not its queries. :meth:`of` builds them from queries (what a real run and the
    simulator's tests hand in); :class:`RecordsBuilder` appends them as queries end.
    """

    __slots__ = ("arrival_s", "finished_s", "flags")

    def __init__(self, arrival_s: np.ndarray, finished_s: np.ndarray, flags: np.ndarray):
        if not len(arrival_s) == len(finished_s) == len(flags):
            raise ValueError(f"{len(arrival_s)} arrivals, {len(finished_s)} finish times, {len(flags)} flags")
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        self.finished_s = np.asarray(finished_s, dtype=np.float64)
        self.flags = np.asarray(flags, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.flags)

    @classmethod
    def of(cls, queries: Iterable[Query]) -> "QueryRecords":
        builder = RecordsBuilder()
        arrival = array("d")
        for q in queries:
            arrival.append(q.arrival_s)
            builder.add(q)
        return builder.build(np.frombuffer(arrival, dtype=np.float64))

    @property
    def outcome_codes(self) -> np.ndarray:
        return self.flags & _CODE_MASK

    def has(self, flag: int) -> np.ndarray:
        """A boolean mask: which queries have ``flag`` (LATE, DEFERRED, SERVED_LIGHT, SCORED)."""
        return (self.flags & flag) != 0


class RecordsBuilder:
    """Appends ended queries' records (in query order) to compact arrays; :meth:`build` adds the arrivals."""

    __slots__ = ("_finished", "_flags")

    def __init__(self):
        self._finished = array("d")
        self._flags = array("B")

    def add(self, q: Query) -> None:
        """Append ``q``'s record: its finish time (NaN: none) and its byte of flags (outcome, late,
        deferred, served light, scored). Runs once for every query of a simulation: the flags are
        worked out here, not in a helper called for each."""
        finished = q.finished_s
        self._finished.append(math.nan if finished is None else finished)
        flags = _OUTCOME_CODE[q.outcome]
        if q.late:
            flags |= LATE
        if q.deferred:
            flags |= DEFERRED
        if q.served_by == "light":
            flags |= SERVED_LIGHT
        if q.confidence is not None:
            flags |= SCORED
        self._flags.append(flags)

    def __len__(self) -> int:
        return len(self._flags)

    def build(self, arrival_s: np.ndarray) -> QueryRecords:
        """The records, with ``arrival_s`` the queries' arrival times (e.g. the trace's array)."""
        return QueryRecords(arrival_s, np.frombuffer(self._finished, dtype=np.float64),
                            np.frombuffer(self._flags, dtype=np.uint8))


Queries = Union[Sequence[Query], QueryRecords]


def as_records(queries: Queries) -> QueryRecords:
    return queries if isinstance(queries, QueryRecords) else QueryRecords.of(queries)


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(
    queries: Queries,
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
    window_s: float = 10.0,
    demand: Sequence[tuple[float, float, float]] = (),
    fallback: bool = False,
) -> dict:
    """The run's headline numbers (see the module docstring for the definitions).

    ``window_s`` and ``demand`` (the controller's samples, which can extend the run's end) place the
    windows of ``mean_fid`` and ``slo_violation_window_mean`` exactly as :func:`timeseries` does.
    ``fallback``: the run answered late deferred queries light (``fallback: light``); adds
    ``mean_fid_fallback_bound`` (absent otherwise). ``fallback_light`` (how many fell back) is always
    there, 0 without the fallback.
    """
    if not window_s > 0:
        raise DiffsimError(f"window_s must be > 0, got {window_s}")
    rec = as_records(queries)
    codes = rec.outcome_codes
    by_code = np.bincount(codes, minlength=len(_OUTCOME_CODE)).tolist()
    counts = {name: by_code[_OUTCOME_CODE[name]] for name in OUTCOMES}
    unfinished = by_code[0]
    late = int(np.count_nonzero(rec.has(LATE)))
    requests = len(rec)
    completed = counts["completed"]
    violations = requests - completed + late  # late completions and every query not completed
    deferred = int(np.count_nonzero(rec.has(DEFERRED)))
    done = codes == _COMPLETED
    light = done & rec.has(SERVED_LIGHT)
    light_served = int(np.count_nonzero(light))
    cascade_mode = _cascade_mode(rec.arrival_s[done], rec.has(SCORED | DEFERRED)[done], plans)
    overall_fid, fid_source = _mix_fid(light[done], cascade_mode, cascade)
    n = window_count(rec, plans, demand, window_s)
    finish_windows = _windows(rec.finished_s[done], window_s, n)
    fids, completions = _window_fids(finish_windows, light[done], cascade_mode, n, cascade)
    a = _windows(rec.arrival_s, window_s, n)
    arrivals = np.bincount(a, minlength=n)
    window_violations = np.bincount(a[~done | rec.has(LATE)], minlength=n)
    busy_windows = arrivals > 0
    lat = rec.finished_s[done] - rec.arrival_s[done]  # in query order, as the mean's summation needs
    busy = float(sum(worker_busy_s))
    fell_back = light & rec.has(DEFERRED)  # deferred queries answered with their light image
    summary = {
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
        "slo_violation_window_mean": (float(np.mean(window_violations[busy_windows] / arrivals[busy_windows]))
                                      if busy_windows.any() else None),
        "mean_fid": weighted_mean(fids, completions),
        "fid_overall_mix": overall_fid,
        "fid_source": fid_source,
        "light_served": light_served,
        "light_fraction": _ratio(light_served, completed),
        "deferred": deferred,
        "deferral_fraction": _ratio(deferred, requests),
        # deferred queries answered with their light image (the run's light fallback; 0 without it)
        "fallback_light": int(np.count_nonzero(fell_back)),
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
    if fallback:
        bound_fids, _ = _window_fids(finish_windows, light[done], cascade_mode, n, cascade, fell_back[done])
        summary["mean_fid_fallback_bound"] = weighted_mean(bound_fids, completions)
    return summary


def _cascade_mode(arrival_s: np.ndarray, scored: np.ndarray, plans: PlanTimeline) -> np.ndarray:
    """Which completed queries (arrival times; scored or deferred) were routed in cascade mode: the mode
    of the plan in force at their arrival (the last applied at or before it, the first before any). With
    no plan known (a real run without plan records), a scored or deferred light image means cascade."""
    if not plans:
        return np.asarray(scored, dtype=bool)
    at = np.maximum(np.searchsorted([when for when, _ in plans], arrival_s, side="right") - 1, 0)
    return np.array([p.mode == "cascade" for _, p in plans], dtype=bool)[at]


def fallback_mix_fid(cascade: Cascade, completed: int, light: int, fallbacks: int) -> float:
    """An upper bound on the FID of a cascade-mode mix of ``completed`` queries, ``light`` of them served
    light, ``fallbacks`` of those deferred queries answered with their light image (light fallback).

    The model. The threshold deferred d = (completed - light + fallbacks) / completed. Its own mix (every
    deferred query served heavy), P_0, has FID fid(1 - d) on the cascade's curve; all light, P_1, has
    fid(1). Which deferred queries fall back depends on timing (queues, deadlines), not on their prompts,
    so the images served are distributed as P_w = (1 - w) P_0 + w P_1, w = fallbacks / deferred: the
    threshold's confident light images, and for the deferred prompts the heavy image or, for a random
    share w of them, the light one.

    Why it bounds the FID from above. With features of mean m and covariance S (m_R, S_R the
    reference's), FID = |m - m_R|^2 + Tr S + Tr S_R - 2 Tr((S_R^1/2 S S_R^1/2)^1/2). For the mixture,
    m_w = (1 - w) m_0 + w m_1 and S_w = (1 - w) S_0 + w S_1 + w (1 - w) D D^T with D = m_0 - m_1. The
    mean term is convex in w, below its chord by exactly w (1 - w) |D|^2; Tr S_w is above its chord by
    the same, so their sum is linear in w. The cross term is at most what it would be without the
    w (1 - w) D D^T part (the trace of a matrix square root grows with the matrix), and that is convex
    in w (the trace of a square root is concave), so below its chord. Hence
    FID(P_w) <= (1 - w) fid(1 - d) + w fid(1), which is what this returns: pessimistic, for the
    population statistics the curve was measured on (a window's few hundred images sample them, as for
    ``mean_fid``) and for fallbacks that do not depend on the prompt. The same chord is what
    :meth:`~diffsim.profiles.Cascade.random_mix_fid` reads for a random mix when no curve was measured.

    With no fallback it is ``cascade.fid(light / completed)``, the curve at the light fraction, exactly.
    """
    if not fallbacks:
        return float(cascade.fid(light / completed))
    if not 0 < fallbacks <= light <= completed:
        raise ValueError(f"{fallbacks} fallbacks among {light} served light of {completed} completed")
    threshold_mix = float(cascade.fid((light - fallbacks) / completed))
    share = fallbacks / (completed - light + fallbacks)  # of the deferred queries, those served light
    return threshold_mix + share * (float(cascade.fid(1.0)) - threshold_mix)


def _mode_fids(light_c, n_c, light_s, n_s, cascade: Cascade, fallback_c: int = 0) -> list[tuple[int, float, str]]:
    """(completed, FID, mode) of each mode that served something: cascade mode reads the cascade's curve
    at its light fraction (with ``fallback_c`` fallbacks among its light, :func:`fallback_mix_fid`'s
    bound), split mode the random-mix line."""
    parts = []
    if n_c:
        parts.append((n_c, fallback_mix_fid(cascade, n_c, light_c, fallback_c), "cascade"))
    if n_s:
        parts.append((n_s, float(cascade.random_mix_fid(light_s / n_s)), "split"))
    return parts


def _mix_fid(light: np.ndarray, cascade_mode: np.ndarray, cascade: Cascade) -> tuple[Optional[float], str]:
    """FID of one served mix (completed queries: served light, routed in cascade mode) and its source."""
    parts = _mode_fids(int(np.count_nonzero(light & cascade_mode)), int(np.count_nonzero(cascade_mode)),
                       int(np.count_nonzero(light & ~cascade_mode)), int(np.count_nonzero(~cascade_mode)), cascade)
    if not parts:
        return None, "none"
    if len(parts) == 1:
        _, fid, mode = parts[0]
        return fid, "cascade" if mode == "cascade" else "random-mix"
    return sum(n * fid for n, fid, _ in parts) / sum(n for n, _, _ in parts), "mixed"


def _window_fids(window: np.ndarray, light: np.ndarray, cascade_mode: np.ndarray, n: int, cascade: Cascade,
                 fell_back: Optional[np.ndarray] = None) -> tuple[list[Optional[float]], list[int]]:
    """Each of ``n`` windows' served-mix FID (None: nothing completed) and completions, given each
    completed query's window (by finish), served light, and cascade mode; with ``fell_back`` (which of
    them were deferred and answered light), cascade mode's FID is :func:`fallback_mix_fid`'s bound."""
    def count(where: np.ndarray) -> list[int]:
        return np.bincount(window[where], minlength=n).tolist()

    light_c, n_c = count(light & cascade_mode), count(cascade_mode)
    light_s, n_s = count(light & ~cascade_mode), count(~cascade_mode)
    fallback_c = count(fell_back & cascade_mode) if fell_back is not None else [0] * n
    fids: list[Optional[float]] = []
    for w in range(n):
        parts = _mode_fids(light_c[w], n_c[w], light_s[w], n_s[w], cascade, fallback_c[w])
        fids.append(sum(c * fid for c, fid, _ in parts) / (n_c[w] + n_s[w]) if parts else None)
    return fids, [c + s for c, s in zip(n_c, n_s)]


def weighted_mean(values: Sequence[Optional[float]], weights: Sequence[int]) -> Optional[float]:
    """Mean of the values that are not None, each weighted by its weight; None when the weights are 0."""
    total = sum(w for v, w in zip(values, weights) if v is not None)
    return sum(v * w for v, w in zip(values, weights) if v is not None) / total if total else None


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


def run_end_s(queries: Queries, plans: PlanTimeline, demand: Sequence[tuple[float, float, float]]) -> float:
    """The last moment anything happened: an arrival, an end, a plan or a demand sample."""
    rec = as_records(queries)
    end = 0.0
    if len(rec):
        end = max(end, float(rec.arrival_s.max()))
        finished = rec.finished_s[~np.isnan(rec.finished_s)]
        if len(finished):
            end = max(end, float(finished.max()))
    if plans:
        end = max(end, plans[-1][0])
    if demand:
        end = max(end, max(t for t, _, _ in demand))
    return end


def window_count(queries: Queries, plans: PlanTimeline, demand: Sequence[tuple[float, float, float]],
                 window_s: float) -> int:
    """How many ``window_s`` windows cover the run, from 0 to :func:`run_end_s` (at least one; an end
    exactly on a boundary falls in the last window)."""
    return max(1, math.ceil(run_end_s(queries, plans, demand) / window_s))


def _windows(t: np.ndarray, window_s: float, n: int) -> np.ndarray:
    """The window of each time in ``t``, clipped to the ``n`` windows (numpy's // is Python's for floats)."""
    return np.clip(np.floor_divide(t, window_s), 0, n - 1).astype(np.int64)


def timeseries(
    queries: Queries,
    plans: PlanTimeline,
    demand: Sequence[tuple[float, float, float]],
    *,
    cascade: Cascade,
    window_s: float = 10.0,
) -> list[dict]:
    """One row per ``window_s`` window from 0 to the end of the run (see the module docstring)."""
    if not window_s > 0:
        raise DiffsimError(f"window_s must be > 0, got {window_s}")
    rec = as_records(queries)
    n = window_count(rec, plans, demand, window_s)

    def window(t: float) -> int:
        return min(n - 1, max(0, int(t // window_s)))

    def count(where: np.ndarray) -> list[int]:  # how many of each window's entries are in ``where``
        return np.bincount(where, minlength=n).tolist()

    codes = rec.outcome_codes
    done = codes == _COMPLETED
    a = _windows(rec.arrival_s, window_s, n)
    f = _windows(rec.finished_s[done], window_s, n)
    arrivals = count(a)
    violations = count(a[~done | rec.has(LATE)])
    late = count(a[rec.has(LATE)])
    dropped = count(a[codes == _DROPPED])
    served_light = rec.has(SERVED_LIGHT)[done]
    light_served = count(f[served_light])
    cascade_mode = _cascade_mode(rec.arrival_s[done], rec.has(SCORED | DEFERRED)[done], plans)
    fids, completions = _window_fids(f, served_light, cascade_mode, n, cascade)
    measured: list[list[float]] = [[] for _ in range(n)]
    estimate: list[list[float]] = [[] for _ in range(n)]
    for t, rate, est in demand:
        w = window(t)
        measured[w].append(rate)
        estimate[w].append(est)

    rows = []
    plan_times = [when for when, _ in plans]  # once: plan_at would rebuild it for every window
    for w in range(n):
        t0, t1 = w * window_s, (w + 1) * window_s
        plan = plan_at(plans, t1, plan_times) if plans and plans[0][0] <= t1 else None
        mode = plan.mode if plan is not None else ""
        r = _ratio(light_served[w], completions[w])
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
                "fid": fids[w],
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


_FIXED = f"%.{DIGITS}f"
_FIXED_BELOW = 10.0 ** (15 - DIGITS)  # below this, a number with DIGITS decimals has at most 15 digits


def _float_text(v) -> str:
    """A float cell as :func:`_cell` writes it (rounded, no "-0.0", empty for None/NaN/inf), without its
    type dispatch for the common case of a Python float."""
    if type(v) is not float:
        return _text(_cell(v))
    if 1e-4 <= abs(v) < _FIXED_BELOW:
        # "%.6f" has the digits round(v, 6) has (both are the correctly rounded decimal, CPython's dtoa in
        # mode 3); with at most 15 significant digits that decimal is also the shortest repr of the
        # rounded float, and repr writes no exponent from 1e-4 up. A third of round + repr's time.
        text = (_FIXED % v).rstrip("0")
        return text + "0" if text[-1] == "." else text
    if v - v != 0:  # NaN or infinite
        return ""
    v = round(v, DIGITS)
    return repr(v) if v else "0.0"


_REPEATED: dict[float, str] = {}  # float cell texts of values that recur (confidences, batch times)


def _repeated_float_text(v) -> str:
    """:func:`_float_text` of a value that recurs across queries (a prompt's confidence, a sum of batch
    times), remembered: a dictionary look-up instead of formatting. Bounded: cleared when full. Floats
    only: 1 == 1.0 == True as keys, but their cells differ."""
    if type(v) is not float:
        return _float_text(v)
    text = _REPEATED.get(v)
    if text is None:
        text = _float_text(v)
        if len(_REPEATED) >= 1 << 16:
            _REPEATED.clear()
        _REPEATED[v] = text
    return text


_SIZES: dict[tuple, str] = {}  # batch_sizes cells by value: a few distinct ones recur on every row


def _sizes_text(batch_sizes) -> str:
    key = tuple(batch_sizes)
    text = _SIZES.get(key)
    if text is None:
        text = "+".join(str(b) for b in batch_sizes)
        if len(_SIZES) >= 1 << 12:
            _SIZES.clear()
        _SIZES[key] = text
    return text


def _flag_text(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return _text(_cell(v))


# Texts queries.csv writes on most rows, known to need no quoting.
_PLAIN_TEXT = frozenset(("", "unfinished", "light", "heavy", "light+heavy") + OUTCOMES)


def _text(value: str) -> str:
    """A field as the csv module writes it: quoted when it holds a delimiter, a quote or a line break."""
    if value in _PLAIN_TEXT:
        return value
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([value, ""])
        return buf.getvalue()[:-2]  # without the trailing ",\n" of the empty field
    return value


def query_line(q: Query) -> str:
    """``q``'s row of queries.csv, newline included: the bytes :func:`write_csv` writes for its
    :func:`query_rows` row, formatted directly (the dicts, the rounding of every cell and the csv
    module took a quarter of a large simulation's time)."""
    arrival, finished = q.arrival_s, q.finished_s
    return ",".join((
        str(q.id) if type(q.id) is int else _text(_cell(q.id)),
        str(q.prompt_id) if type(q.prompt_id) is int else _text(_cell(q.prompt_id)),
        _float_text(arrival),
        _text(q.outcome or "unfinished"),
        _flag_text(q.late),
        _float_text(finished),
        _float_text(None if finished is None else finished - arrival),
        _text(q.served_by or ""),
        _flag_text(q.deferred),
        _repeated_float_text(q.confidence),
        _text("+".join(q.stages)),
        _sizes_text(q.batch_sizes),
        _float_text(q.queue_s),
        _repeated_float_text(q.service_s),
    )) + "\n"


class QueryCsv:
    """queries.csv written a row at a time (:meth:`write`, in query order), so a run need not keep its
    queries until the end; rows are buffered and written in blocks. Use as a context manager, or
    :meth:`close` it."""

    _BLOCK = 4096

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fh = open(self.path, "w", newline="")
        self._fh.write(",".join(QUERY_COLUMNS) + "\n")
        self._lines: list[str] = []
        self.rows = 0

    def write(self, q: Query) -> None:
        self._lines.append(query_line(q))
        self.rows += 1
        if len(self._lines) >= self._BLOCK:
            self._flush()

    def _flush(self) -> None:
        self._fh.write("".join(self._lines))
        self._lines.clear()

    def close(self) -> None:
        if not self._fh.closed:
            self._flush()
            self._fh.close()

    def __enter__(self) -> "QueryCsv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_query_csv(path: Path | str, queries: Iterable[Query]) -> None:
    """queries.csv of ``queries``: the same bytes as ``write_csv(path, query_rows(queries), QUERY_COLUMNS)``."""
    with QueryCsv(path) as out:
        for q in queries:
            out.write(q)


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


def make_out_dir(out_dir: Path | str) -> Path:
    """The output folder, created if need be (an error names it if it cannot be)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffsimError(f"{out}: cannot create the output folder: {e.strerror or e}") from None
    return out


def write_outputs(out_dir: Path | str, summary: dict, rows: Sequence[dict], *, plot: bool = True) -> list[Path]:
    """Write summary.json, timeseries.csv and (unless ``plot`` is False) timeline.png; return the paths."""
    out = make_out_dir(out_dir)
    written = [out / SUMMARY_FILE, out / TIMESERIES_FILE]
    dump_json(written[0], summary)
    write_csv(written[1], rows, TIMESERIES_COLUMNS)
    if plot:
        from .plot import plot_timeline  # matplotlib only when a plot is wanted

        written.append(out / TIMELINE_FILE)
        plot_timeline(rows, summary, written[-1])
    return written
