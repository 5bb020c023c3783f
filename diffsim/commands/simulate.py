"""``diffsim simulate``: run one policy over a trace in the discrete-event simulator and report it.

With no arguments it runs the shipped default scenario: ``traces/dynamic.csv``, cascade
``sdturbo-sdv15`` on 16 ``a100`` GPUs, policy ``diffserve``, seed 0, writing to ``out/simulate``.
Settings are layered: defaults < ``--config FILE`` < command-line flags.

Writes into ``--out``: ``summary.json`` (headline numbers), ``timeseries.csv`` (one row per window),
``timeline.png`` (unless ``--no-plot``), ``queries.csv`` (one row per query) and ``plans.csv`` (one row
per applied plan). The same settings and seed give byte-identical files, except ``wall_s`` in
summary.json (the run's wall-clock time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..reports import metrics
from ..errors import DiffsimError

DEFAULT_TRACE = "dynamic.csv"
DEFAULT_OUT = "out/simulate"


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``simulate`` and ``compare`` share; each defaults to None so the config file can fill it."""
    p.add_argument("--config", metavar="FILE", help="YAML config file (flags override its settings)")
    p.add_argument("--trace", metavar="FILE", help=f"trace CSV, a path or a shipped name (default {DEFAULT_TRACE})")
    p.add_argument("--cascade", metavar="C", help="cascade name (default sdturbo-sdv15)")
    p.add_argument("--gpu", metavar="a100|PATH", help="GPU latency profile: shipped name or YAML path (default a100)")
    p.add_argument("--cascades", metavar="FILE", help="cascades file (default: the shipped profiles/cascades.yaml)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--routing", choices=("random", "least-loaded"),
                   help="worker choice within a stage (default least-loaded; random is the paper's)")
    p.add_argument("--max-utilization", type=float, metavar="U",
                   help="MILP policies plan each stage to at most this fraction of its capacity (default 0.8)")
    p.add_argument("--batch-wait", type=float, metavar="W",
                   help="fraction of a batch time the MILP counts as waiting for the batch in flight (default 0)")
    p.add_argument("--window-s", type=float, metavar="S", help="time-series window in seconds (default 10)")
    p.add_argument("--service-time", choices=("p50", "sampled"),
                   help="batch times: the profile's p50 (default), or drawn from a log-normal fitted to the "
                        "profile's p50/p95/p99 (what a measured profile says a real batch does)")
    p.add_argument("--fail-worker", action="append", metavar="W[,W...]@T",
                   help="lose these workers at simulated second T, as if their GPU or node died: the batch they "
                        "run is served again elsewhere and the plan shrinks (repeatable; e.g. 3@120, 2,3@120)")
    p.add_argument("--recover-worker", action="append", metavar="W[,W...]@T",
                   help="bring lost workers back at second T; the next plan uses them (repeatable)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of the table")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate one policy over a trace (no GPU needed)",
        description=(
            "Simulate serving a trace with one policy, from latency profiles (SimPy). With no arguments: "
            f"traces/{DEFAULT_TRACE}, sdturbo-sdv15 on 16 a100 GPUs, policy diffserve, seed 0, output in "
            f"{DEFAULT_OUT}/. Settings: defaults < --config < flags. Writes summary.json, timeseries.csv, "
            "timeline.png, queries.csv and plans.csv; the same settings give byte-identical files, except "
            "wall_s in summary.json (wall-clock time)."
        ),
    )
    add_scenario_arguments(p)
    p.add_argument("--gpus", type=int, metavar="N", help="number of GPUs (default 16)")
    p.add_argument("--policy", metavar="P", help="policy (default diffserve)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown on stderr when it is a terminal)")


def scenario_settings(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    """Config-file settings overlaid with the flags that were given."""
    from ..config import read_config_file

    settings = read_config_file(args.config) if args.config else {}
    for key in ("trace", "cascade", "gpu", "cascades", "seed", "routing", "window_s", "max_utilization",
                "batch_wait", "service_time") + extra:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    flags = [(text, False, "--fail-worker") for text in getattr(args, "fail_worker", None) or []]
    flags += [(text, True, "--recover-worker") for text in getattr(args, "recover_worker", None) or []]
    if flags:
        from ..config import parse_fault

        faults = [parse_fault(text, recover, flag) for text, recover, flag in flags]
        settings["faults"] = [{"at_s": f.at_s, "workers": list(f.workers), "recover": f.recover} for f in faults]
    return settings


def load_scenario(settings: dict):
    """The simulator config and the trace the settings name, and the trace's name for the reports."""
    from ..config import build_sim_config
    from ..resources import resolve_trace
    from ..workload.traces import read_trace

    trace_name = str(settings.get("trace", DEFAULT_TRACE))
    trace = read_trace(resolve_trace(trace_name))
    if not len(trace):
        raise DiffsimError(f"{trace_name}: the trace has no requests")
    config = build_sim_config(settings)
    return config, trace, trace_name


def run(args: argparse.Namespace) -> int:
    from ..reports.comparison import summarize_result
    from ..simulator import simulate

    config, trace, trace_name = load_scenario(scenario_settings(args, ("gpus", "policy")))
    # The bar is for people watching: on a terminal, unless --quiet (it goes to stderr either way).
    result = simulate(config, trace, progress=not args.quiet and sys.stderr.isatty())
    summary = summarize_result(result, trace_name)
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=config.cascade, window_s=config.window_s)
    out = Path(args.out)
    written = metrics.write_outputs(out, summary, rows, plot=not args.no_plot)
    metrics.write_csv(out / metrics.QUERIES_FILE, metrics.query_rows(result.queries), metrics.QUERY_COLUMNS)
    metrics.write_csv(out / metrics.PLANS_FILE, metrics.plan_rows(result.plans), metrics.PLAN_COLUMNS)
    written += [out / metrics.QUERIES_FILE, out / metrics.PLANS_FILE]
    if args.json:
        print(json.dumps(metrics.rounded(summary), sort_keys=True, indent=2))
    else:
        print(format_summary(summary))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_summary(s: dict) -> str:
    """The console summary: scenario, outcomes, quality, latency, resources."""
    lines = [
        f"{s['cascade']} on {s['gpus']} x {s['gpu']}, policy {s['policy']}, trace {s['trace']}, seed {s['seed']}",
        "",
        f"  requests            {s['requests']}",
        f"  completed           {s['completed']}  (on time {s['on_time']}, late {s['late']})",
        f"  dropped             {s['dropped']}",
    ]
    for key in ("failed", "rejected", "unfinished"):
        if s.get(key):
            lines.append(f"  {key:<19} {s[key]}")
    lines += [
        f"  SLO violations      {s['violations']}  ({_pct(s['slo_violation_ratio'])} of requests, SLO {s['slo_s']:g} s)",
        f"  FID of served mix   {_num(s['mean_fid'], '.2f')}  ({s['fid_source']})",
        f"  light-served        {_pct(s['light_fraction'])} of completed; deferred {_pct(s['deferral_fraction'])} of requests",
        f"  latency p50 / p99   {_num(s['latency_p50_s'])} s / {_num(s['latency_p99_s'])} s",
        f"  throughput          {_num(s['throughput_qps'], '.2f')} qps over {_num(s['duration_s'], '.1f')} s",
        f"  GPU utilization     {_pct(s['gpu_utilization'])}",
        f"  plans               {s['plans_applied']} applied, {s['plan_changes']} changes, {s['infeasible_plans']} infeasible",
        f"  wall time           {_num(s['wall_s'], '.2f')} s ({s.get('events', 0)} events)",
    ]
    return "\n".join(lines)
