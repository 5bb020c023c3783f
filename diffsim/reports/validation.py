"""How far the simulator predicts a real server: one simulated run set beside K real runs of the same trace.

For each figure the real runs give K values; their own spread (max - min) says how much two runs of the
same server differ. ``diffsim validate`` simulates each real run from its own start state and with its
own measured batch times; the simulator's value is the mean over those simulations, judged against the
real runs' mean: a relative error for rates and
times, an absolute one (in points) for ratios and counts, and ``within_spread`` says whether it is no
further from the mean than the real runs' spread or the figure's tolerance (the issue's targets:
throughput 5%, latency 15%, ratios 3 points), whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..query import Query


@dataclass(frozen=True)
class Figure:
    name: str
    relative: bool  # error relative to the real mean (else absolute)
    tolerance: float  # relative fraction, or absolute units


FIGURES = (
    Figure("throughput_qps", True, 0.05),
    Figure("latency_p50_s", True, 0.15),
    Figure("latency_p95_s", True, 0.15),
    Figure("latency_p99_s", True, 0.15),
    Figure("slo_violation_ratio", False, 0.03),
    Figure("dropped", False, 0.0),
    Figure("rejected", False, 0.0),
    Figure("deferral_fraction", False, 0.03),
    Figure("light_fraction", False, 0.03),
    Figure("plans_applied", False, 0.0),
)


def figures_of(summary: dict, queries: Sequence[Query]) -> dict[str, Optional[float]]:
    """The compared figures of one run: its summary's, with p95 latency computed from its queries."""
    lat = [q.latency_s for q in queries if q.outcome == "completed" and q.latency_s is not None]
    out = {f.name: summary.get(f.name) for f in FIGURES}
    out["latency_p95_s"] = float(np.percentile(lat, 95)) if lat else None
    return out


def mean_figures(runs: Sequence[dict]) -> dict[str, Optional[float]]:
    """Per figure, the mean over runs of the values known (None where no run has one)."""
    out = {}
    for f in FIGURES:
        known = [r.get(f.name) for r in runs if r.get(f.name) is not None]
        out[f.name] = float(np.mean(known)) if known else None
    return out


def outcome_class(q: Query) -> str:
    """on_time, late, dropped, rejected, failed or unfinished."""
    if q.outcome is None:
        return "unfinished"
    if q.outcome == "completed":
        return "late" if q.late else "on_time"
    return q.outcome


def outcome_pairs(sim_queries: Sequence[Query], real_queries: Sequence[Query]) -> dict[str, int]:
    """Request by request (the same trace, in order), how the simulated and the real outcome pair up:
    ``{"sim/real": count}`` (e.g. ``"late/dropped"``: late in the simulation, dropped for real)."""
    pairs: dict[str, int] = {}
    for a, b in zip(sim_queries, real_queries):
        key = f"{outcome_class(a)}/{outcome_class(b)}"
        pairs[key] = pairs.get(key, 0) + 1
    return dict(sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])))


def compare(sim: dict, real: Sequence[dict], sim_runs: Optional[Sequence[dict]] = None) -> dict:
    """``{figure: {"sim", "real": [...], "error", "error_kind", "spread", "tolerance", "within_spread"}}``,
    plus ``"sim_runs": [...]`` (one simulation per real run) when given."""
    result = {}
    for f in FIGURES:
        s = sim.get(f.name)
        values = [r.get(f.name) for r in real]
        known = [v for v in values if v is not None]
        entry = {"sim": s, "real": values, "error": None, "error_kind": "relative" if f.relative else "absolute",
                 "spread": None, "tolerance": f.tolerance, "within_spread": None}
        if sim_runs is not None:
            entry["sim_runs"] = [r.get(f.name) for r in sim_runs]
        if s is not None and known:
            mean = float(np.mean(known))
            spread = float(max(known) - min(known))
            if f.relative:
                error = (s - mean) / mean if mean else (0.0 if s == 0 else float("inf"))
                allowed = max(f.tolerance, spread / mean if mean else 0.0)
            else:
                error = s - mean
                allowed = max(f.tolerance, spread)
            entry.update(error=error, spread=spread, within_spread=bool(abs(error) <= allowed + 1e-12))
        result[f.name] = entry
    return result


def format_table(comparison: dict) -> str:
    """Side by side: sim, real mean (min..max), error, within."""
    lines = [f"{'figure':<20} {'sim':>10} {'real mean':>10} {'real min..max':>21} {'error':>9}  within",
             "-" * 80]
    for name, e in comparison.items():
        known = [v for v in e["real"] if v is not None]
        mean = f"{np.mean(known):.4g}" if known else "-"
        rng = f"{min(known):.4g}..{max(known):.4g}" if known else "-"
        sim = "-" if e["sim"] is None else f"{e['sim']:.4g}"
        if e["error"] is None:
            err = "-"
        elif e["error_kind"] == "relative":
            err = f"{100 * e['error']:+.1f}%"
        else:
            err = f"{e['error']:+.3g}"
        within = "-" if e["within_spread"] is None else ("yes" if e["within_spread"] else "NO")
        lines.append(f"{name:<20} {sim:>10} {mean:>10} {rng:>21} {err:>9}  {within}")
    return "\n".join(lines)


def plot(path, sim_runs: Sequence[Sequence[Query]], real_runs: Sequence[Sequence[Query]], sim_rows, real_rows) -> None:
    """Latency CDFs (each simulated run against each real run) and SLO violations per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))

    def cdf(ax, queries, **kw):
        lat = np.sort([q.latency_s for q in queries if q.outcome == "completed" and q.latency_s is not None])
        if lat.size:
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, **kw)

    for k, queries in enumerate(sim_runs):
        cdf(a, queries, color="C0", lw=1.5, alpha=0.8, label="simulated" if k == 0 else None)
    for k, queries in enumerate(real_runs):
        cdf(a, queries, color="C1", alpha=0.7, label="real" if k == 0 else None)
    a.set_xlabel("latency of completed requests (s)")
    a.set_ylabel("fraction")
    a.set_title("latency CDF")
    a.legend()
    for k, rows in enumerate(sim_rows):
        b.plot([r["t_start_s"] for r in rows], [r["violations"] for r in rows], color="C0", lw=1.5, alpha=0.8,
               label="simulated" if k == 0 else None)
    for k, rows in enumerate(real_rows):
        b.plot([r["t_start_s"] for r in rows], [r["violations"] for r in rows], color="C1", alpha=0.7,
               label="real" if k == 0 else None)
    b.set_xlabel("time (s)")
    b.set_ylabel("SLO violations per window")
    b.set_title("violations per window")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
