"""``diffsim plan``: ask the allocator for one plan and print it."""

from __future__ import annotations

import argparse
import json

from ..errors import DiffsimError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="solve the allocator once and print the plan",
        description="Solve the allocator for one demand level: workers and batch size per stage, threshold, "
        "predicted capacity, latency, deferral fraction and expected FID.",
    )
    p.add_argument("--cascade", default="sdturbo-sdv15", help="cascade name (default: %(default)s)")
    p.add_argument("--gpu", default="a100", help="GPU profile: a shipped name (a100, h100-eager, h100-graph) or a YAML path")
    p.add_argument("--cascades", default=None, help="cascades/quality YAML (default: the shipped profiles/cascades.yaml)")
    p.add_argument("--gpus", type=int, default=16, help="GPUs available (default: %(default)s)")
    p.add_argument("--demand", type=float, required=True, help="demand in queries per second")
    p.add_argument("--objective", choices=("quality", "max-threshold"), default="quality")
    p.add_argument("--mode", choices=("cascade", "split", "light-only", "heavy-only"), default="cascade",
                   help="cascade (DiffServe), split (Proteus), or a single model (Clipper)")
    p.add_argument("--queue-delay-s", default="0,0", metavar="L,H",
                   help="queueing delay estimates of the light and heavy stage, seconds (default: 0,0)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="allowed batch sizes (default: %(default)s)")
    p.add_argument("--max-utilization", type=float, default=None,
                   help="plan each stage to at most this fraction of its capacity "
                        "(default: the serving policies' 0.8; 1 is the paper's capacity >= demand)")
    p.add_argument("--batch-wait", type=float, default=0.0,
                   help="fraction of a batch time counted as waiting for the batch in flight (default 0, as the paper)")
    p.add_argument("--thresholds", default=None,
                   help="threshold grid, comma-separated (default: 0, 0.005, ..., 1)")
    p.add_argument("--solver", choices=("exact", "milp"), default="exact",
                   help="exact (structured, microseconds) or milp (the formulation of record, scipy/HiGHS); "
                        "both give the same plan (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DiffsimError(f"--{what}: expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..allocator import allocate
    from ..policies import DEFAULT_MAX_UTILIZATION
    from ..profiles import load_cascade
    from ..resources import profiles_dir, resolve_profile

    delays = _floats(args.queue_delay_s, "queue-delay-s")
    if len(delays) != 2:
        raise DiffsimError(f"--queue-delay-s: expected two numbers L,H, got {args.queue_delay_s!r}")
    sizes = _floats(args.batch_sizes, "batch-sizes")
    if any(b != int(b) for b in sizes):
        raise DiffsimError(f"--batch-sizes: expected integers, got {args.batch_sizes!r}")
    thresholds = _floats(args.thresholds, "thresholds") if args.thresholds else None
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
