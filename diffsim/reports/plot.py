"""PNG plots of runs: the timeline of one run and the comparisons of several.

* :func:`plot_timeline` — stacked panels over time, like DiffServe's Figure 5: demand (arrival rate,
  the controller's estimate, throughput), workers per stage, batch sizes, threshold (or light share),
  SLO-violation ratio and FID per window.
* :func:`plot_comparison` — FID (y) against SLO-violation ratio (x), one labelled point per run
  (the paper's Figures 4 and 6: lower-left is better).
* :func:`plot_sweep` — violation ratio and FID against a swept value (GPU count, threshold), a line per
  policy.

matplotlib is imported lazily and drawn through the Agg canvas directly (no pyplot global state), so
these work headless and in worker processes. PNG metadata carries no version or date, so the same
rows give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

LIGHT_COLOR = "tab:orange"
HEAVY_COLOR = "tab:blue"
PNG_METADATA = {"Software": None}  # keep the files byte-stable across runs


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, sharex: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=sharex, squeeze=False)
    return fig, axes


def _save(fig, path: Path | str) -> None:
    fig.savefig(Path(path), format="png", metadata=PNG_METADATA)


def _num(v) -> float:
    return math.nan if v is None or v == "" else float(v)


def _steps(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """x at window edges and y per window, repeated at the end, for ``step(where="post")``."""
    xs = [_num(r["t_start_s"]) for r in rows] + [_num(rows[-1]["t_end_s"])]
    ys = [_num(r.get(key)) for r in rows]
    return xs, ys + ys[-1:]


def _as_drawn(rows: Sequence[dict], end_s) -> list[dict]:
    """The rows as the timeline draws them (timeseries.csv keeps whole windows).

    The last window usually runs past the run's end (the drain after the last arrival): it is cut at
    ``end_s`` and its rates are counted over the time it covers, instead of over a whole window, where
    they would look like a fall in throughput. Windows after the trace's last arrival have no arrival
    rate (the trace has ended; nothing fell to 0 qps).
    """
    drawn = [dict(r) for r in rows]
    last = drawn[-1]
    start, end = _num(last["t_start_s"]), _num(last["t_end_s"])
    if end_s is not None and start < float(end_s) < end:
        scale = (end - start) / (float(end_s) - start)
        last["t_end_s"] = float(end_s)
        for key in ("arrival_qps", "throughput_qps"):
            if not math.isnan(_num(last.get(key))):
                last[key] = _num(last[key]) * scale
    with_arrivals = [i for i, r in enumerate(drawn) if _num(r.get("arrivals")) > 0]
    for r in drawn[with_arrivals[-1] + 1:] if with_arrivals else []:
        r["arrival_qps"] = None
    return drawn


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _fmt(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def plot_timeline(rows: Sequence[dict], summary: dict, path: Path | str) -> None:
    """The run over time, one panel per quantity, sharing the time axis."""
    if not rows:
        raise ValueError("no time-series rows to plot")
    rows = _as_drawn(rows, summary.get("duration_s"))
    fig, axes = _figure(11, 13, rows=6, sharex=True)
    ax_demand, ax_workers, ax_batch, ax_threshold, ax_viol, ax_fid = axes[:, 0]
    split = any(r.get("mode") == "split" for r in rows)

    x, y = _steps(rows, "arrival_qps")
    ax_demand.step(x, y, where="post", color="0.35", lw=1.2, label="arrival rate")
    x, y = _steps(rows, "throughput_qps")
    ax_demand.step(x, y, where="post", color="tab:green", lw=1.0, alpha=0.8, label="throughput")
    x, y = _steps(rows, "demand_estimate_qps")
    ax_demand.step(x, y, where="post", color="tab:red", lw=1.4, ls="--", label="demand estimate")
    ax_demand.set_ylabel("queries / s")
    ax_demand.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=3, frameon=False)
    ax_demand.set_title("Demand", loc="left", fontsize=10)

    x, light = _steps(rows, "light_workers")
    _, heavy = _steps(rows, "heavy_workers")
    light0 = [0.0 if math.isnan(v) else v for v in light]
    total = [a + (0.0 if math.isnan(b) else b) for a, b in zip(light0, heavy)]
    ax_workers.fill_between(x, 0, light0, step="post", color=LIGHT_COLOR, alpha=0.7, label="light workers")
    ax_workers.fill_between(x, light0, total, step="post", color=HEAVY_COLOR, alpha=0.7, label="heavy workers")
    gpus = summary.get("gpus")
    if gpus:
        ax_workers.axhline(gpus, color="0.3", lw=0.8, ls=":", label=f"{gpus} GPUs")
        ax_workers.set_ylim(0, gpus * 1.08)
    ax_workers.set_ylabel("workers")
    ax_workers.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=3, frameon=False)
    ax_workers.set_title("Workers per stage (stacked)", loc="left", fontsize=10)

    for role, color in (("light", LIGHT_COLOR), ("heavy", HEAVY_COLOR)):
        x, y = _steps(rows, f"{role}_batch_size")
        _, workers = _steps(rows, f"{role}_workers")
        y = [b if w and w > 0 else math.nan for b, w in zip(y, workers)]  # a stage with no worker has no batch size
        label = f"{role} batch size"
        ax_batch.step(x, y, where="post", color=color, lw=1.5, label=label)
    ax_batch.set_yscale("log", base=2)
    ax_batch.set_yticks([1, 2, 4, 8, 16, 32], labels=["1", "2", "4", "8", "16", "32"])
    ax_batch.set_ylim(0.8, 40)
    ax_batch.set_ylabel("batch size")
    ax_batch.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=2, frameon=False)
    ax_batch.set_title("Batch sizes in force", loc="left", fontsize=10)

    key, label = ("light_share", "light share (split routing)") if split else ("threshold", "confidence threshold")
    x, y = _steps(rows, key)
    ax_threshold.step(x, y, where="post", color="tab:purple", lw=1.5)
    ax_threshold.set_ylabel(key.replace("_", " "))
    top = max([v for v in y if not math.isnan(v)], default=0.0)
    ax_threshold.set_ylim(-0.02, max(0.1, top * 1.15))
    ax_threshold.set_title(label.capitalize(), loc="left", fontsize=10)

    x, y = _steps(rows, "slo_violation_ratio")
    ax_viol.step(x, [v * 100 for v in y], where="post", color="tab:red", lw=1.3)
    ax_viol.set_ylabel("violations (%)")
    ax_viol.set_ylim(bottom=0)
    ax_viol.set_title(
        f"SLO-violation ratio per window (by arrival; run: {_pct(summary.get('slo_violation_ratio'))}, "
        f"mean of windows: {_pct(summary.get('slo_violation_window_mean'))})",
        loc="left",
        fontsize=10,
    )

    x, y = _steps(rows, "fid")
    ax_fid.step(x, y, where="post", color="tab:brown", lw=1.3)
    ax_fid.set_ylabel("FID")
    ax_fid.set_title(
        f"FID of the served mix per window (by finish; run, weighted by completions: "
        f"{_fmt(summary.get('mean_fid'))}; at the overall mix: {_fmt(summary.get('fid_overall_mix'))})",
        loc="left",
        fontsize=10,
    )
    ax_fid.set_xlabel("time (s)")
    ax_fid.set_xlim(x[0], x[-1])

    for ax in axes[:, 0]:
        ax.grid(True, alpha=0.3)
    fig.suptitle(_run_title(summary), fontsize=11)
    _save(fig, path)


def _run_title(summary: dict) -> str:
    parts = [summary.get("cascade", "")]
    if summary.get("gpus"):
        parts.append(f"on {summary['gpus']} x {summary.get('gpu', '')}")
    if summary.get("policy"):
        parts.append(f"policy {summary['policy']}")
    if summary.get("trace"):
        parts.append(f"trace {Path(str(summary['trace'])).name}")
    return ", ".join(p for p in parts if p)


def run_label(row: dict, varying: Sequence[str] = ()) -> str:
    """``policy`` plus the values of the swept fields, e.g. ``diffserve (gpus=8)``."""
    extras = [f"{k}={row[k]:g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in varying]
    return f"{row['policy']} ({', '.join(extras)})" if extras else str(row["policy"])


def _short(row: dict, varying: Sequence[str]) -> str:
    parts = []
    for k in varying:
        v = row.get(k)
        parts.append(f"{v} GPUs" if k == "gpus" else f"{k[0]}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def _merge_close(points: list[tuple[float, float, str]], frac: float = 0.04) -> list[tuple[float, float, str]]:
    """One label per cluster of points closer than ``frac`` of the axis spans, texts joined in order."""
    if not points:
        return []
    xspan = (max(p[0] for p in points) - min(p[0] for p in points)) or 1.0
    yspan = (max(p[1] for p in points) - min(p[1] for p in points)) or 1.0
    clusters: list[list] = []  # [x, y, [texts]]
    for x, y, text in points:
        for c in clusters:
            if abs(c[0] - x) <= frac * xspan and abs(c[1] - y) <= frac * yspan:
                if text not in c[2]:
                    c[2].append(text)
                break
        else:
            clusters.append([x, y, [text]])
    return [(x, y, ", ".join(texts)) for x, y, texts in clusters]


def plot_comparison(rows: Sequence[dict], path: Path | str, *, title: str = "", varying: Sequence[str] = ()) -> None:
    """FID against SLO-violation ratio, one point per run; runs without a FID are skipped.

    Without sweeps each point is labelled with its policy. With sweeps (``varying``: the swept fields)
    a policy's points are joined in sweep order, the legend names the policies and each point is
    labelled with its sweep values. Runs that land on the same spot share one label.
    """
    fig, axes = _figure(8.5, 6)
    ax = axes[0, 0]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(sorted(policies))}
    points: list[tuple[float, float, str]] = []
    for policy in policies:
        pts = [r for r in rows if r["policy"] == policy and r.get("mean_fid") is not None
               and r.get("slo_violation_ratio") is not None]
        if not pts:
            continue
        xs = [100 * r["slo_violation_ratio"] for r in pts]
        ys = [r["mean_fid"] for r in pts]
        style = dict(color=colors[policy], zorder=3)
        if varying:
            ax.plot(xs, ys, marker="o", ms=7, lw=1, alpha=0.85, label=policy, **style)
        else:
            ax.scatter(xs, ys, s=60, **style)
        points += [(xv, yv, _short(r, varying) if varying else policy) for r, xv, yv in zip(pts, xs, ys)]
    for xv, yv, text in _merge_close(points):
        ax.annotate(text, (xv, yv), xytext=(6, 5), textcoords="offset points", fontsize=9)
    ax.set_xlabel("SLO-violation ratio (%)")
    ax.set_ylabel("FID of served images (lower is better)")
    ax.margins(x=0.15, y=0.12)
    hi = max(ax.get_xlim()[1], 1.0)
    ax.set_xlim(-0.03 * hi, hi)  # the origin (no violations) stays in view
    ax.grid(True, alpha=0.3)
    if varying:
        ax.legend(fontsize=9, loc="best")
    ax.set_title(title or "Quality against SLO violations (lower-left is better)", fontsize=11)
    _save(fig, path)


def plot_sweep(
    rows: Sequence[dict],
    x_key: str,
    path: Path | str,
    *,
    title: str = "",
    x_label: str = "",
    series: Sequence[str] = (),
) -> None:
    """Violation ratio and FID against ``x_key`` (e.g. ``gpus``, ``threshold``), a line per policy
    (per policy and value of each ``series`` field, when another field varies too)."""
    fig, axes = _figure(11, 4.8, rows=1, cols=2)
    ax_viol, ax_fid = axes[0]
    labels = sorted({run_label(r, series) for r in rows})
    for i, label in enumerate(labels):
        pts = sorted((r for r in rows if run_label(r, series) == label), key=lambda r: r[x_key])
        xs = [r[x_key] for r in pts]
        style = dict(marker="o", color=f"C{i % 10}", label=label)
        ax_viol.plot(xs, [100 * _num(r.get("slo_violation_ratio")) for r in pts], **style)
        ax_fid.plot(xs, [_num(r.get("mean_fid")) for r in pts], **style)
    for ax, ylabel in ((ax_viol, "SLO-violation ratio (%)"), (ax_fid, "FID (lower is better)")):
        ax.set_xlabel(x_label or x_key)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if x_key == "gpus":
        ticks = sorted({r["gpus"] for r in rows})
        for ax in (ax_viol, ax_fid):
            ax.set_xticks(ticks)
    ax_viol.set_ylim(bottom=0)
    ax_fid.legend(fontsize=9)
    fig.suptitle(title or f"Sweep over {x_label or x_key}", fontsize=11)
    _save(fig, path)
