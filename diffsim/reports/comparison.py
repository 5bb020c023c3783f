"""Run one scenario under several policies (and sweep points) in parallel processes, and tabulate them.

A :class:`Scenario` is everything the runs share (the base simulator config and the trace); a
:class:`RunSpec` is what one run changes: the policy, the GPU count, and optionally a pinned threshold
(a threshold sweep: the policy's allocator still picks workers and batch sizes, but only at that
threshold). Every run uses the scenario's seed, so policies see the same arrivals and the same
discriminator confidences (common random numbers), and a run's result depends only on its spec: the
number of worker processes changes how long a comparison takes, never its numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional

from . import metrics

# Columns of comparison.csv and the console table, in order. wall_s is left out of both so that they
# are byte-stable; comparison.json keeps it per run.
COMPARISON_COLUMNS = (
    "policy",
    "gpus",
    "threshold",
    "pinned_share",
    "requests",
    "completed",
    "late",
    "dropped",
    "slo_violation_ratio",
    "slo_violation_window_mean",
    "mean_fid",
    "fid_overall_mix",
    "fid_source",
    "latency_p50_s",
    "latency_p99_s",
    "light_fraction",
    "deferral_fraction",
    "gpu_utilization",
    "threshold_mean",
    "light_workers_mean",
    "heavy_workers_mean",
    "plan_changes",
    "infeasible_plans",
)
FALLBACK_FID = "mean_fid_fallback_bound"  # runs with a light fallback only (metrics.summarize)


def with_fallback_columns(columns: Sequence[str], fallback: str) -> tuple[str, ...]:
    """``columns`` for a scenario whose ``fallback`` is the config's: with a light fallback, the FID
    that does not flatter fallbacks (``mean_fid_fallback_bound``) follows ``mean_fid`` and how many
    queries fell back (``fallback_light``) comes last; without one they are unchanged (the files keep
    their bytes)."""
    columns = tuple(columns)
    if fallback == "none":
        return columns
    if "mean_fid" in columns:
        i = columns.index("mean_fid") + 1
        columns = columns[:i] + (FALLBACK_FID,) + columns[i:]
    return columns + ("fallback_light",)


@dataclass(frozen=True)
class RunSpec:
    policy: str
    gpus: int
    threshold: Optional[float] = None  # pinned threshold; None lets the policy choose

    @property
    def name(self) -> str:
        """A folder-safe name, e.g. ``diffserve_g16`` or ``static_g16_t0.05``."""
        name = f"{self.policy}_g{self.gpus}"
        return name if self.threshold is None else f"{name}_t{self.threshold:g}"


@dataclass(frozen=True)
class Scenario:
    config: object  # diffsim.config.SimConfig: the policy and gpus of each run replace its own
    trace: object  # diffsim.workload.traces.Trace
    trace_name: str
    window_s: float = 10.0


@dataclass
class RunResult:
    spec: RunSpec
    summary: dict
    rows: list[dict]

    def table_row(self) -> dict:
        return {**self.summary, "policy": self.spec.policy, "gpus": self.spec.gpus, "threshold": self.spec.threshold}


def run_one(scenario: Scenario, spec: RunSpec) -> RunResult:
    """Simulate one spec and turn it into its summary and time series (runs in a worker process)."""
    from ..simulator import simulate

    config = replace(scenario.config, policy=spec.policy, gpus=spec.gpus)
    policy = None  # the simulator makes config.policy
    if spec.threshold is not None:
        from ..policies import policy_for

        policy = policy_for(config, thresholds=(spec.threshold,))
    result = simulate(config, scenario.trace, progress=False, policy=policy)
    summary = summarize_result(result, scenario.trace_name)
    summary["threshold_pinned"] = spec.threshold
    # An infeasible plan at the pinned threshold falls back to the best-effort plan (threshold 0): say for
    # what share of the run the pinned threshold was really in force.
    summary["pinned_share"] = (None if spec.threshold is None else metrics._time_weighted(
        result.plans, result.duration_s, lambda p: float(p.threshold == spec.threshold)))
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=config.cascade, window_s=scenario.window_s)
    return RunResult(spec, summary, rows)


def summarize_result(result, trace_name: str) -> dict:
    """:func:`diffsim.reports.metrics.summarize` of a :class:`~diffsim.simulator.SimResult`, plus the run's events."""
    config = result.config
    summary = metrics.summarize(
        result.queries,
        result.plans,
        cascade=config.cascade,
        gpus=config.gpus,
        worker_busy_s=result.worker_busy_s,
        duration_s=result.duration_s,
        wall_s=result.wall_s,
        policy=config.policy,
        seed=config.seed,
        trace=trace_name,
        window_s=config.window_s,
        demand=result.demand,
        fallback=config.fallback != "none",
    )
    summary["events"] = result.events
    summary["routing"] = config.routing
    if config.service_time != "p50":
        summary["service_time"] = config.service_time
    if config.fallback != "none":
        summary["fallback"] = config.fallback
    if result.faults:
        summary["faults"] = [{"at_s": t, "workers": list(ws), "recover": rec} for t, ws, rec in result.faults]
    return summary


def default_jobs(runs: int) -> int:
    return max(1, min(os.cpu_count() or 1, runs))


def run_all(scenario: Scenario, specs: Sequence[RunSpec], jobs: Optional[int] = None, *, on_done=None) -> list[RunResult]:
    """Every spec's result, in the order of ``specs`` whatever the number of ``jobs``.

    ``jobs`` 1 runs in this process; more uses a process pool. ``on_done(result)`` is called as each
    run finishes (for progress), in completion order.
    """
    jobs = default_jobs(len(specs)) if jobs is None else max(1, min(jobs, len(specs)))
    if jobs == 1:
        results = []
        for spec in specs:
            results.append(run_one(scenario, spec))
            if on_done:
                on_done(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, scenario, spec) for spec in specs]
        if on_done:
            from concurrent.futures import as_completed

            for fut in as_completed(futures):
                on_done(fut.result())
        return [f.result() for f in futures]


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain fixed-width text table; floats with 4 significant decimals, None as '-'."""
    cells = [[_text(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))
    return "\n".join(lines)


def _text(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
