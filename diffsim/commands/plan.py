"""``diffsim plan``: ask the allocator for one plan and print it."""

from __future__ import annotations

import argparse
import json

from .. import limits
from .args import bounded, nonempty, number_list


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="solve the allocator once and print the plan",
        description="Solve the allocator for one demand level: workers and batch size per stage, threshold, "
        "predicted capacity, latency, deferral fraction and expected FID.",
    )
    p.add_argument("--cascade", default="sdturbo-sdv15", type=nonempty, help="cascade name (default: %(default)s)")
    p.add_argument("--gpu", default="a100", type=nonempty,
                   help="GPU profile: a shipped name (a100, h100-eager, h100-graph) or a YAML path")
    p.add_argument("--cascades", default=None, type=nonempty,
                   help="cascades/quality YAML (default: the shipped profiles/cascades.yaml)")
    p.add_argument("--gpus", type=limits.GPUS, default=16, help=bounded("GPUs available", limits.GPUS, 16))
    p.add_argument("--demand", type=limits.DEMAND_QPS, required=True,
                   help=bounded("demand in queries per second", limits.DEMAND_QPS))
    p.add_argument("--objective", choices=("quality", "max-threshold"), default="quality")
    p.add_argument("--mode", choices=("cascade", "split", "light-only", "heavy-only"), default="cascade",
                   help="cascade (DiffServe), split (Proteus), or a single model (Clipper)")
    p.add_argument("--queue-delay-s", default="0,0", metavar="L,H",
                   help=bounded("queueing delay estimates of the light and heavy stage, seconds", limits.QUEUE_DELAY_S,
                                "0,0"))
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32",
                   help=bounded("allowed batch sizes", limits.BATCH_SIZE, "1,2,4,8,16,32"))
    p.add_argument("--max-utilization", type=limits.FRACTION_ABOVE_0, default=None,
                   help=bounded("plan each stage to at most this fraction of its capacity; 1 is the paper's "
                                "capacity >= demand", limits.FRACTION_ABOVE_0, "the serving policies' 0.8"))
    p.add_argument("--batch-wait", type=limits.FRACTION, default=0.0,
                   help=bounded("fraction of a batch time counted as waiting for the batch in flight",
                                limits.FRACTION, "0, as the paper"))
    p.add_argument("--thresholds", default=None,
                   help=bounded("threshold grid, comma-separated", limits.FRACTION, "0, 0.005, ..., 1"))
    p.add_argument("--solver", choices=("exact", "milp"), default="exact",
                   help="exact (structured, microseconds) or milp (the formulation of record, scipy/HiGHS); "
                        "both give the same plan (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..allocator import allocate
    from ..policies import DEFAULT_MAX_UTILIZATION
    from ..profiles import load_cascade
    from ..resources import profiles_dir, resolve_profile

    delays = number_list(args.queue_delay_s, "--queue-delay-s", limits.QUEUE_DELAY_S, count=2)
    sizes = number_list(args.batch_sizes, "--batch-sizes", limits.BATCH_SIZE, most=limits.MAX_BATCH_SIZES)
    thresholds = None
    if args.thresholds is not None:  # an empty grid is an error, not the default grid
        thresholds = number_list(args.thresholds, "--thresholds", limits.FRACTION, most=10_000)
    cascades = args.cascades or str(profiles_dir() / "cascades.yaml")
    cascade = load_cascade(args.cascade, resolve_profile(args.gpu), cascades)
    plan = allocate(
        cascade,
        args.gpus,
        args.demand,
        queue_delay_s=(delays[0], delays[1]),
        batch_sizes=[int(b) for b in sizes],
        thresholds=thresholds,
        objective=args.objective,
        mode=args.mode,
        max_utilization=DEFAULT_MAX_UTILIZATION if args.max_utilization is None else args.max_utilization,
        batch_wait=args.batch_wait,
        solver=args.solver,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), sort_keys=True))
    else:
        print(format_plan(plan, cascade.gpu))
    return 0


def format_plan(plan, gpu: str = "") -> str:
    lines = [
        f"cascade {plan.cascade} on {plan.gpus} x {gpu or 'GPU'}   demand {plan.demand_qps:g} qps   "
        f"objective {plan.objective}   mode {plan.mode}",
        "",
        f"{'stage':<6} {'model':<16} {'workers':>7} {'batch':>5} {'batch s':>8} {'capacity qps':>12}",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.role:<6} {s.model:<16} {s.workers:>7} {s.batch_size:>5} {s.latency_s:>8.3f} {s.capacity_qps:>12.2f}"
        )
    routing = (f"threshold {plan.threshold:g}" if plan.mode == "cascade"
               else f"light share {plan.light_share:.3f}")
    lines += [
        "",
        f"{routing}   deferral fraction {plan.deferral_fraction:.3f}   expected FID {plan.expected_fid:.2f}",
        f"predicted latency {plan.predicted_latency_s:.3f} s   GPUs used {plan.gpus_used}/{plan.gpus}   "
        f"solved in {plan.solve_ms:.1f} ms",
        "feasible: yes" if plan.feasible else f"feasible: NO - {plan.reason} (best-effort plan shown)",
    ]
    return "\n".join(lines)
