"""``diffsim compare``: the same trace under several policies (and sweep points), side by side.

Each run is one ``diffsim simulate`` with the scenario's seed; runs go to parallel processes
(``--jobs``, default min(CPUs, runs)) and the results do not depend on the number of jobs.
``--sweep-gpus 8,16,32`` repeats every policy at each GPU count; ``--sweep-thresholds 0,0.05,...``
pins the threshold at each value (the allocator still picks workers and batch sizes).

Writes into ``--out``: ``comparison.csv`` (a row per run, byte-stable), ``comparison.json`` (the
scenario and every run's full summary, wall_s included), ``comparison.png`` (FID against
SLO-violation ratio, a point per run), ``sweep_gpus.png`` / ``sweep_thresholds.png`` for sweeps, and
``runs/<policy>_g<gpus>[_t<threshold>]/`` with each run's summary.json and timeseries.csv.

Progress goes to stderr as runs finish: a tqdm bar with each run's line above it when stderr is a
terminal, the plain lines otherwise (a log, a pipe), nothing with ``--quiet``. The table and the files
carry the per-request violation ratio and its per-window mean, and the windowed FID and the FID of the
overall mix (:mod:`diffsim.reports.metrics`); with ``--fallback light`` also the windowed FID that does
not flatter fallbacks (``mean_fid_fallback_bound``, after ``mean_fid``) and how many queries fell back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..reports import metrics
from ..reports.comparison import (COMPARISON_COLUMNS, RunSpec, Scenario, default_jobs, format_table, run_all,
                                  with_fallback_columns)
from .. import limits
from ..errors import DiffsimError
from .args import bounded, name_list, nonempty, number_list
from .simulate import add_scenario_arguments, load_scenario, scenario_settings

DEFAULT_POLICIES = "diffserve,clipper-light,clipper-heavy,static,proteus"
DEFAULT_OUT = "out/compare"
THRESHOLD_POLICIES = ("diffserve", "diffserve-maxt", "static")  # the cascade policies: a threshold to pin
CONSOLE_COLUMNS = (  # "threshold" (the pinned one) and "pinned_share" are added for threshold sweeps
    "policy",
    "gpus",
    "slo_violation_ratio",
    "slo_violation_window_mean",
    "mean_fid",
    "fid_overall_mix",
    "latency_p50_s",
    "latency_p99_s",
    "light_fraction",
    "dropped",
    "late",
    "gpu_utilization",
    "threshold_mean",
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="simulate several policies on one trace and compare them",
        description=(
            "Simulate the same trace under several policies (and GPU-count or threshold sweeps) in "
            "parallel processes. Writes comparison.csv, comparison.json, comparison.png, sweep plots and "
            "runs/<run>/ (summary.json, timeseries.csv). Results do not depend on --jobs; only wall_s in "
            "comparison.json and runs/*/summary.json varies between identical runs."
        ),
    )
    add_scenario_arguments(p)
    p.add_argument("--gpus", type=limits.GPUS, metavar="N",
                   help=bounded("number of GPUs; see --sweep-gpus", limits.GPUS, 16))
    p.add_argument("--policies", default=DEFAULT_POLICIES, metavar="P,P,...", help=f"policies (default {DEFAULT_POLICIES})")
    p.add_argument("--sweep-gpus", metavar="N,N,...",
                   help=bounded("run every policy at each of these GPU counts", limits.GPUS))
    p.add_argument("--sweep-thresholds", metavar="T,T,...",
                   help=bounded("run every policy with the threshold pinned at each value; a run whose plans at "
                                "that threshold were infeasible fell back to a lower one: the pinned_share column "
                                "says for what share of the run the pinned threshold was in force", limits.FRACTION))
    p.add_argument("--jobs", type=limits.JOBS, metavar="N",
                   help=bounded("parallel processes; default min(CPUs, runs)", limits.JOBS))
    p.add_argument("--out", metavar="DIR", type=nonempty, default=DEFAULT_OUT,
                   help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (a bar when stderr is a terminal, else a line per finished run)")


def build_specs(args: argparse.Namespace, policies: list[str], gpus: int) -> list[RunSpec]:
    gpu_counts = [gpus]
    if args.sweep_gpus is not None:  # an empty list is an error, not "no sweep"
        gpu_counts = number_list(args.sweep_gpus, "--sweep-gpus", limits.GPUS, unique=True)
    thresholds: list = [None]
    if args.sweep_thresholds is not None:
        thresholds = number_list(args.sweep_thresholds, "--sweep-thresholds", limits.FRACTION, unique=True)
        other = [p for p in policies if p not in THRESHOLD_POLICIES]
        if other:
            raise DiffsimError(
                f"--sweep-thresholds: policy {other[0]!r} has no confidence threshold "
                f"(threshold sweeps take {', '.join(THRESHOLD_POLICIES)})"
            )
    return [RunSpec(p, g, t) for p in policies for g in gpu_counts for t in thresholds]


def run(args: argparse.Namespace) -> int:
    from ..policies import POLICY_NAMES

    policies = name_list(args.policies, "--policies")
    for name in policies:
        if name not in POLICY_NAMES:
            raise DiffsimError(f"--policies: unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})")
    settings = scenario_settings(args, ("gpus",))
    settings.pop("policy", None)  # --policies decides
    config, trace, trace_name = load_scenario(settings, args)
    specs = build_specs(args, policies, config.gpus)
    scenario = Scenario(config=config, trace=trace, trace_name=trace_name, window_s=config.window_s)
    jobs = args.jobs or default_jobs(len(specs))

    progress = None if args.quiet else Progress(len(specs), sys.stderr)
    try:
        results = run_all(scenario, specs, jobs, on_done=progress.done if progress else None)
    finally:
        if progress:
            progress.close()

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffsimError(f"{out}: cannot create the output folder: {e.strerror or e}") from None
    rows = [r.table_row() for r in results]
    metrics.write_csv(out / "comparison.csv", rows, with_fallback_columns(COMPARISON_COLUMNS, config.fallback))
    metrics.dump_json(
        out / "comparison.json",
        {
            "scenario": {
                "cascade": config.cascade.name,
                "gpu": config.cascade.gpu,
                "trace": trace_name,
                "seed": config.seed,
                "routing": config.routing,
                "fallback": config.fallback,
                "window_s": config.window_s,
            },
            "runs": rows,
        },
    )
    for r in results:
        metrics.write_outputs(out / "runs" / r.spec.name, r.summary, r.rows, plot=False)
    written = [out / "comparison.csv", out / "comparison.json", out / "runs"]
    if not args.no_plot:
        written += _plots(out, rows, args, config)

    if args.json:
        print(json.dumps(metrics.rounded(rows), sort_keys=True, indent=2))
    else:
        columns = CONSOLE_COLUMNS
        if args.sweep_thresholds:
            columns = columns[:2] + ("threshold", "pinned_share") + columns[2:]
        columns = with_fallback_columns(columns, config.fallback)  # with the fallback: its FID bound, its count
        print(format_table(rows, columns))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_line(result) -> str:
    """One finished run, as the progress shows it: its name, violations (per request and the per-window
    average) and FID (per window and of the overall mix)."""
    s = result.summary

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    def fid(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    bound = f", with fallbacks at worst {fid(s['mean_fid_fallback_bound'])}" if "mean_fid_fallback_bound" in s else ""
    return (f"{result.spec.name}: violations {pct(s['slo_violation_ratio'])} (per-window mean "
            f"{pct(s.get('slo_violation_window_mean'))}), FID {fid(s['mean_fid'])} (overall mix "
            f"{fid(s.get('fid_overall_mix'))}{bound}) ({s['wall_s']:.1f} s)")


class Progress:
    """Progress of a comparison on ``stream`` (stderr): on a terminal a tqdm bar with each finished run's
    line above it; otherwise (a log file, a pipe) the plain lines only, no bar's control characters."""

    def __init__(self, total: int, stream):
        from ..progress import progress_bar

        self.stream = stream
        self.total = total
        self.finished = 0
        self.bar = progress_bar(stream=stream, total=total, desc="runs", unit="run")

    def done(self, result) -> None:
        self.finished += 1
        line = f"[{self.finished}/{self.total}] {run_line(result)}"
        if self.bar.disable:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _plots(out: Path, rows: list[dict], args: argparse.Namespace, config) -> list[Path]:
    from ..reports.plot import plot_comparison, plot_sweep

    varying = [k for k, flag in (("gpus", args.sweep_gpus), ("threshold", args.sweep_thresholds)) if flag]
    title = f"{config.cascade.name} on {config.cascade.gpu}: FID against SLO violations (lower-left is better)"
    paths = [out / "comparison.png"]
    plot_comparison(rows, paths[0], title=title, varying=varying)
    for key, label, name in (("gpus", "GPUs", "sweep_gpus.png"), ("threshold", "pinned threshold", "sweep_thresholds.png")):
        if key in varying:
            paths.append(out / name)
            plot_sweep(rows, key, paths[-1], x_label=label, title=f"{config.cascade.name}: sweep over {label}",
                       series=[k for k in varying if k != key])
    return paths
