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
from typing import Optional

from .. import limits
from ..reports import metrics
from ..errors import DiffsimError
from ..runtime.batching import FALLBACKS
from .args import bounded, nonempty

DEFAULT_TRACE = "dynamic.csv"
DEFAULT_OUT = "out/simulate"


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``simulate`` and ``compare`` share; each defaults to None so the config file can fill it."""
    p.add_argument("--config", metavar="FILE", type=nonempty,
                   help="YAML config file (flags override its settings); every key, its type and bounds: "
                        "README.md, 'Config file'")
    p.add_argument("--trace", metavar="FILE", type=nonempty,
                   help=f"trace CSV, a path or a shipped name (default {DEFAULT_TRACE})")
    p.add_argument("--cascade", metavar="C", type=nonempty, help="cascade name (default sdturbo-sdv15)")
    p.add_argument("--gpu", metavar="a100|PATH", type=nonempty,
                   help="GPU latency profile: shipped name or YAML path (default a100)")
    p.add_argument("--cascades", metavar="FILE", type=nonempty,
                   help="cascades file (default: the shipped profiles/cascades.yaml)")
    p.add_argument("--seed", type=limits.SEED, help=bounded("random seed", limits.SEED, 0))
    p.add_argument("--routing", choices=("random", "least-loaded"),
                   help="worker choice within a stage (default least-loaded; random is the paper's)")
    p.add_argument("--max-utilization", type=limits.FRACTION_ABOVE_0, metavar="U",
                   help=bounded("MILP policies plan each stage to at most this fraction of its capacity",
                                limits.FRACTION_ABOVE_0, 0.8))
    p.add_argument("--batch-wait", type=limits.FRACTION, metavar="W",
                   help=bounded("fraction of a batch time the MILP counts as waiting for the batch in flight",
                                limits.FRACTION, 0))
    p.add_argument("--preset", choices=("artifact",),
                   help="a named set of settings under the config file's and the flags': artifact = every setting "
                        "as the DiffServe artifact has it (random routing, capacity >= demand, in-system demand "
                        "x 1.2, Little's-law queue delay, ...; diffsim/presets.py)")
    p.add_argument("--demand", choices=("arrival", "in-system"),
                   help="what the demand EWMA is taken of: the arrival rate (default) or the queries in the "
                        "system (the artifact's; give controller headroom 1.2 with it, as --preset artifact does)")
    p.add_argument("--queue-model", choices=("little", "mean", "tail"),
                   help="queueing delay the MILP plans with: little = one delay measured under the plan in force "
                        "(the artifact's), mean / tail = computed per candidate plan from its workers, batch size, "
                        "load and the backlog (tail: --tail-quantile of latency meets the SLO); default: little")
    p.add_argument("--tail-quantile", type=limits.QUANTILE, metavar="Q",
                   help=bounded("--queue-model tail plans so that this quantile of all queries' latency meets the SLO",
                                limits.QUANTILE, 0.99))
    p.add_argument("--fallback", choices=FALLBACKS,
                   help="what a deferred query whose heavy image could not be ready by its SLO deadline gets: "
                        "none = served late by the heavy model or dropped (default), light = its light image, on "
                        "time (with --queue-model mean or tail the heavy stage is then planned to its capacity)")
    p.add_argument("--window-s", type=limits.WINDOW_S, metavar="S",
                   help=bounded(f"time-series window in seconds, at most {limits.MAX_WINDOWS:,} windows over the "
                                "trace", limits.WINDOW_S, 10))
    p.add_argument("--service-time", choices=("p50", "sampled"),
                   help="batch times and request overheads: the profile's p50 (default), or drawn from "
                        "log-normals fitted to the profile's p50/p95/p99 (batch times in slow spells when the "
                        "profile has batch_time_correlation; overheads from its overheads: request_*_ms)")
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
            "wall_s in summary.json (wall-clock time). The config file (--config) is YAML with the keys of the "
            "flags and more (controller, static_plan, faults, ...): every key, its type and bounds are in "
            "README.md, section 'Config file'."
        ),
    )
    add_scenario_arguments(p)
    p.add_argument("--gpus", type=limits.GPUS, metavar="N", help=bounded("number of GPUs", limits.GPUS, 16))
    p.add_argument("--policy", metavar="P", type=nonempty, help="policy (default diffserve)")
    p.add_argument("--out", metavar="DIR", type=nonempty, default=DEFAULT_OUT,
                   help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown on stderr when it is a terminal)")


def scenario_settings(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    """Config-file settings overlaid with the flags that were given."""
    from ..config import read_config_file

    settings = read_config_file(args.config) if args.config else {}
    for key in ("trace", "cascade", "gpu", "cascades", "seed", "routing", "window_s", "max_utilization",
                "batch_wait", "service_time", "preset", "demand", "queue_model", "tail_quantile", "fallback") + extra:
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


def load_scenario(settings: dict, args: Optional[argparse.Namespace] = None):
    """The simulator config and the trace the settings name, and the trace's name for the reports.

    With the command's ``args``, a setting that is out of bounds or inconsistent with another is
    reported under its source: the flag (``--window-s: ...``) or the config file (``run.yaml: faults: ...``).
    """
    from ..config import build_sim_config
    from ..errors import SettingError
    from ..resources import resolve_trace
    from ..workload.traces import read_trace
    from ..textfile import read_text

    trace_name = str(settings.get("trace", DEFAULT_TRACE))
    trace = read_trace(resolve_trace(trace_name))
    if not len(trace):
        raise DiffsimError(f"{trace_name}: the trace has no requests")
    try:
        config = build_sim_config(settings)
        windows = trace.duration_s / config.window_s
        if windows > limits.MAX_WINDOWS:
            raise SettingError("window_s", f"{config.window_s:g} s windows over the trace's {trace.duration_s:g} s "
                               f"make {windows:,.0f} windows, more than {limits.MAX_WINDOWS:,}: use longer windows")
    except SettingError as e:
        if args is None:
            raise
        raise DiffsimError(f"{setting_source(args, e.field)}: {e.problem}") from None
    confidences = config.confidences_path or config.cascade.confidences_path
    if confidences is not None:
        read_text(confidences)  # a missing or binary file: one line naming it, before the run starts
    return config, trace, trace_name


def setting_source(args: argparse.Namespace, field: str) -> str:
    """Where a setting came from, as an error message should name it: the flag, or the config file and key."""
    key = field.split(".")[0]
    if key == "faults" and (getattr(args, "fail_worker", None) or getattr(args, "recover_worker", None)):
        return "--fail-worker/--recover-worker"
    if getattr(args, key, None) is not None:
        return "--" + key.replace("_", "-")
    if getattr(args, "config", None):
        return f"{args.config}: {field}"
    return "--" + key.replace("_", "-")  # the default is in force: the flag is how to change it


def run(args: argparse.Namespace) -> int:
    from ..reports.comparison import summarize_result
    from ..simulator import simulate

    config, trace, trace_name = load_scenario(scenario_settings(args, ("gpus", "policy")), args)
    out = metrics.make_out_dir(args.out)
    # queries.csv is written as queries end, so the run keeps only their compact records (memory stays
    # bounded on traces of millions of requests); a run that fails leaves no partial file behind.
    partial = out / (metrics.QUERIES_FILE + ".part")
    try:
        with metrics.QueryCsv(partial) as query_csv:
            # The bar is for people watching: on a terminal, unless --quiet (it goes to stderr either way).
            result = simulate(config, trace, progress=not args.quiet and sys.stderr.isatty(),
                              keep_queries=False, on_query=query_csv.write)
        partial.replace(out / metrics.QUERIES_FILE)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary = summarize_result(result, trace_name)
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=config.cascade, window_s=config.window_s)
    written = metrics.write_outputs(out, summary, rows, plot=not args.no_plot)
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
        f"{s['cascade']} on {s['gpus']} x {s['gpu']}, policy {s['policy']}, trace {s['trace']}"
        + ("" if s.get("seed") is None else f", seed {s['seed']}"),  # a served run (diffsim load) has no seed
        "",
        f"  requests            {s['requests']}",
        f"  completed           {s['completed']}  (on time {s['on_time']}, late {s['late']})",
        f"  dropped             {s['dropped']}",
    ]
    for key in ("failed", "rejected", "unfinished"):
        if s.get(key):
            lines.append(f"  {key:<19} {s[key]}")
    lines += [
        f"  SLO violations      {s['violations']}  ({_pct(s['slo_violation_ratio'])} of requests, "
        f"{_pct(s.get('slo_violation_window_mean'))} per window on average; SLO {s['slo_s']:g} s)",
        f"  FID of served mix   {_num(s['mean_fid'], '.2f')} per window, {_num(s.get('fid_overall_mix'), '.2f')} "
        f"at the run's overall light fraction  ({s['fid_source']})",
    ]
    if "mean_fid_fallback_bound" in s:  # runs with a light fallback: the reading that does not flatter it
        lines.append(f"  FID, fallbacks      {_num(s['mean_fid_fallback_bound'], '.2f')} per window at most "
                     f"({s.get('fallback_light', 0)} deferred queries answered light)")
    lines += [
        f"  light-served        {_pct(s['light_fraction'])} of completed; deferred {_pct(s['deferral_fraction'])} of requests",
        f"  latency p50 / p99   {_num(s['latency_p50_s'])} s / {_num(s['latency_p99_s'])} s",
        f"  throughput          {_num(s['throughput_qps'], '.2f')} qps over {_num(s['duration_s'], '.1f')} s",
        f"  GPU utilization     {_pct(s['gpu_utilization'])}",
        f"  plans               {s['plans_applied']} applied, {s['plan_changes']} changes, {s['infeasible_plans']} infeasible",
        f"  wall time           {_num(s['wall_s'], '.2f')} s"
        + ("" if s.get("events") is None else f" ({s['events']} events)"),  # simulated runs count events
    ]
    return "\n".join(lines)
