"""What ``diffsim compare`` reports, plus what it does not: violations at peak load, role switches, and
plans that leave queued work without a worker (issue 13's targets).

    python benchmarks/policy_targets.py [compare's scenario flags] --policies P,P --sweep-gpus 8,12,16

Takes the scenario flags of ``diffsim compare`` (``--preset``, ``--routing``, ``--max-utilization``,
``--queue-model``, ``--demand``, ``--config``, ...) and runs the same simulations (same settings, same
seed: the violation ratio and FID columns are those ``diffsim compare`` prints for the same flags), then
prints one markdown row per run:

* ``viol`` / ``viol (window mean)``: the run's SLO-violation ratio per request, and the mean over 10 s
  windows of each window's ratio (the DiffServe artifact's figure) (summary.json:
  ``slo_violation_ratio``, ``slo_violation_window_mean``);
* ``FID`` / ``FID (overall mix)``: the completion-weighted mean of the windows' served-mix FIDs, and the
  FID at the run's overall light fraction (summary.json: ``mean_fid``, ``fid_overall_mix``);
* ``FID (fallbacks at worst)``, with ``--fallback light`` only: ``FID`` with each window's fallbacks read
  as a random share of its deferred queries' light images, an upper bound on the window's FID where
  ``FID`` flatters them (summary.json: ``mean_fid_fallback_bound``; :func:`diffsim.reports.metrics.fallback_mix_fid`);
* ``peak viol``: the violation ratio over the ``--window-s`` windows whose arrival rate exceeds
  ``--peak-qps`` (default 25 qps: on ``traces/dynamic.csv`` the eight 10 s windows of its peak, 2,392
  requests), counted by arrival time as timeseries.csv does;
* ``switches/min``: role switches (workers whose role changes when a plan is applied, as the
  dispatcher assigns them: fewest switches) per minute of the run, and the most in any 60 s;
* ``stranded``: applied plans that gave a stage no worker while it had queued work;
* ``FID (on time)``: as ``FID``, counting only the images served within the SLO (cascade-mode runs): what
  a plan's quality is when its late images are worth nothing to the client;
* ``fallback``: deferred queries answered with their light image (``--fallback light``; summary.json:
  ``fallback_light``), and their share of the deferred ones.

``--rate-bins 10,15,20,25`` adds a table per run of the windows grouped by their arrival rate (the
trace's, the same for every policy; edges in qps): each group's completion-weighted FID (windows by
finish, as ``FID``), light fraction served and violation ratio (windows by arrival).
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffsim import limits  # noqa: E402
from diffsim.commands.simulate import add_scenario_arguments, load_scenario, scenario_settings  # noqa: E402
from diffsim.reports import metrics  # noqa: E402
from diffsim.reports.comparison import summarize_result  # noqa: E402
from diffsim.runtime.roles import assign_roles, switched  # noqa: E402

class _Recorder:
    """Wraps a policy to remember the input each plan was made for (the backlog it saw)."""

    def __init__(self, policy):
        self.policy = policy
        self.name = policy.name
        self.reads_peak_demand = policy.reads_peak_demand
        self.inputs = {}

    def plan(self, inp):
        plan = self.policy.plan(inp)
        self.inputs[id(plan)] = inp
        return plan


def role_switches(plans, gpus: int) -> list[tuple[float, int]]:
    """(time, workers switched) per applied plan after the first, replaying the dispatcher's assignment."""
    roles = [None] * gpus
    out = []
    for i, (t, plan) in enumerate(plans):
        new = assign_roles(roles, plan.light.workers, plan.heavy.workers)
        if i:
            out.append((t, len(switched(roles, new))))
        roles = new
    return out


def by_rate(rows, edges):
    """(low, high, windows, completion-weighted FID, light fraction served, violation ratio) per group of
    windows whose arrival rate lies in [low, high)."""
    out = []
    lows = ([0.0] if edges[0] > 0 else []) + edges
    for lo, hi in zip(lows, lows[1:] + [float("inf")]):
        group = [r for r in rows if lo <= r["arrival_qps"] < hi]
        done = sum(r["completions"] for r in group if r["fid"] is not None)
        arrivals = sum(r["arrivals"] for r in group)
        fid = metrics.weighted_mean([r["fid"] for r in group], [r["completions"] for r in group])
        light = sum(r["light_served"] for r in group) / done if done else None
        out.append((lo, hi, len(group), fid, light, sum(r["violations"] for r in group) / arrivals if arrivals else None))
    return out


def run(args_and_spec):
    settings, policy, gpus, peak_qps, switch_margin, edges = args_and_spec
    from diffsim.policies import policy_for
    from diffsim.simulator import simulate

    config, trace, trace_name = load_scenario(settings)
    config = replace(config, policy=policy, gpus=gpus)
    made = policy_for(config) if switch_margin is None else policy_for(config, switch_margin=switch_margin)
    recorder = _Recorder(made)
    result = simulate(config, trace, policy=recorder)
    summary = summarize_result(result, trace_name)
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=config.cascade,
                              window_s=config.window_s)
    cascade_only = all(plan.mode == "cascade" for _, plan in result.plans)
    peak = [r for r in rows if r["arrival_qps"] > peak_qps]
    peak_arrivals = sum(r["arrivals"] for r in peak)
    switches = role_switches(result.plans, gpus)
    minutes = result.duration_s / 60.0
    worst = max((sum(n for t, n in switches if s <= t < s + 60.0) for s, _ in switches), default=0)
    stranded = 0
    for _, plan in result.plans[1:]:
        inp = recorder.inputs.get(id(plan))
        if inp is not None and any(q > 0 and st.workers == 0 for q, st in zip(inp.queue_lengths, plan.stages)):
            stranded += 1
    return {
        "policy": policy, "gpus": gpus,
        "violations": summary["slo_violation_ratio"], "window_violations": summary["slo_violation_window_mean"],
        "fid": summary["mean_fid"], "fid_overall": summary["fid_overall_mix"],
        "fid_bound": summary.get("mean_fid_fallback_bound"), "fallback": config.fallback,
        "peak_violations": sum(r["violations"] for r in peak) / peak_arrivals if peak_arrivals else None,
        "peak_requests": peak_arrivals, "peak_windows": len(peak),
        "switches_per_min": sum(n for _, n in switches) / minutes if minutes else 0.0,
        "max_switches_60s": worst, "stranded": stranded,
        # the FID of the images served within the SLO: summary.json's mean_fid over those alone
        "fid_on_time": metrics.summarize(
            [q for q in result.queries if not q.late], result.plans, cascade=config.cascade, gpus=gpus,
            worker_busy_s=result.worker_busy_s, duration_s=result.duration_s, wall_s=0.0,
            window_s=config.window_s)["mean_fid"] if cascade_only else None,
        "fallback_light": summary["fallback_light"], "deferred": summary["deferred"],
        "by_rate": by_rate(rows, edges) if edges else [],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(p)
    p.add_argument("--policies", default="diffserve,diffserve-maxt,static,clipper-light,clipper-heavy,proteus")
    p.add_argument("--sweep-gpus", default="16")
    p.add_argument("--peak-qps", type=float, default=25.0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rate-bins", default="", help="edges (qps) of arrival-rate groups of windows, e.g. 10,15,20,25")
    p.add_argument("--switch-margin", type=float, default=None,
                   help="the MILP policies' hysteresis margin (diffsim.policies.SWITCH_MARGIN unless given; 0: none)")
    p.add_argument("--stabilization-s", type=float, default=None, metavar="S",
                   help="controller.stabilization_s: with --queue-model mean or tail, the window of past demand "
                        "a role switch must carry (60 unless the config file or this gives it; 0: none)")
    args = p.parse_args(argv)
    if args.switch_margin is not None and not 0 <= args.switch_margin < 1:
        p.error(f"--switch-margin: must lie in [0, 1), got {args.switch_margin:g}")
    if args.stabilization_s is not None and not limits.STABILIZATION_S.contains(args.stabilization_s):
        p.error(f"--stabilization-s: must be {limits.STABILIZATION_S.describe()}, got {args.stabilization_s:g}")
    settings = scenario_settings(args)
    if args.stabilization_s is not None:
        settings["controller"] = {**(settings.get("controller") or {}), "stabilization_s": args.stabilization_s}
    edges = [float(e) for e in args.rate_bins.split(",") if e.strip()]
    specs = [(settings, pol, int(g), args.peak_qps, args.switch_margin, edges) for pol in args.policies.split(",")
             for g in args.sweep_gpus.split(",")]
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(specs)))) as pool:
        results = list(pool.map(run, specs))
    peak = results[0]
    print(f"peak windows: {peak['peak_windows']} ({peak['peak_requests']} requests, > {args.peak_qps:g} qps)")
    fallback = peak["fallback"] != "none"  # the same for every run: a scenario flag
    bound_head = " FID (fallbacks at worst) |" if fallback else ""
    print(f"| policy | GPUs | viol | viol (window mean) | FID |{bound_head} FID (overall mix) | peak viol "
          "| switches/min (max in 60 s) | stranded | FID (on time) | fallback |")
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fallback else ""))

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    def fid(v):
        return "-" if v is None else f"{v:.2f}"

    for r in results:
        bound = f" {fid(r['fid_bound'])} |" if fallback else ""
        print(f"| {r['policy']} | {r['gpus']} | {pct(r['violations'])} | {pct(r['window_violations'])} | "
              f"{fid(r['fid'])} |{bound} {fid(r['fid_overall'])} | {pct(r['peak_violations'])} | "
              f"{r['switches_per_min']:.1f} ({r['max_switches_60s']}) | {r['stranded']} | {fid(r['fid_on_time'])} | "
              f"{r['fallback_light']} ({pct(r['fallback_light'] / r['deferred'] if r['deferred'] else None)}) |")
    if edges:
        print("\n| policy | GPUs | arrival rate (qps) | windows | FID | light served | viol |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            for lo, hi, n, f, light, v in r["by_rate"]:
                span = f"{lo:g}-{hi:g}" if hi != float("inf") else f">= {lo:g}"
                light_s = "-" if light is None else f"{light:.3f}"
                print(f"| {r['policy']} | {r['gpus']} | {span} | {n} | {fid(f)} | {light_s} | {pct(v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
