"""How far the simulator predicts the real server: ``diffsim validate`` on three traces.

Starts ``diffsim serve`` in a process of its own -- ``--backend cpu-tiny`` (tiny random models on the
CPU, 2 workers, SLO 2 s, the start-up profile measured on both workers at once) or ``--backend emulated``
(workers that hold each batch for the A100 profile's time, confidences drawn from the cascade's deferral
curve, the cascade's SLO) --, reads its planned capacity, and validates the simulator against it on:

* ``steady``: Poisson at ~70% of that capacity;
* ``bursty``: Gamma gaps (cv 3) at a mean above it;
* ``deferring``: Poisson at 70% of the highest demand at which the server's own policy (asked with the
  server's profile and settings) still plans to defer queries to the heavy model. At the other two rates
  the plans serve everything light. On cpu-tiny the random-weight discriminator scores every image about
  0.5, above any threshold the policy picks, so nothing is deferred there either: the heavy stage is
  exercised with ``--backend emulated``, whose confidences follow the deferral curve.

Each trace is replayed ``--repeats`` times for the real system's own spread (validate simulates each real
run from its own start state, with the batch times and request overhead measured in it). Prints
validate's tables and the machine's load average before and after each trace (the figures move with it on
a shared machine); writes validate's reports under ``--out``.

    .venv/bin/python benchmarks/bench_fidelity.py --out out/fidelity                     # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_fidelity.py --out out/fid-emulated --backend emulated --gpus 4
    .venv/bin/python benchmarks/bench_fidelity.py --out out/fidelity --ray     # workers in their own processes

The figures depend on this machine; the comparison (sim against the real spread) is what to read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import httpx
from bench_promises import _wait_listening, stop_server  # the same serve subprocess handling

from diffsim import cli


TRACES = {  # name -> the trace generator and its shape (the rate is the server's, found at start-up)
    "steady": ["poisson"],
    "bursty": ["gamma", "--cv", "3"],
    "deferring": ["poisson"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each trace (default 60)")
    ap.add_argument("--repeats", type=int, default=3, help="real runs per trace (default 3)")
    ap.add_argument("--steady", type=float, default=0.7, help="steady trace's rate, x capacity (default 0.7)")
    ap.add_argument("--bursty", type=float, default=1.1, help="bursty trace's mean rate, x capacity (default 1.1)")
    ap.add_argument("--deferring", type=float, default=0.7,
                    help="deferring trace's rate, x the highest demand the server's plans still defer at (default 0.7)")
    ap.add_argument("--traces", default="steady,bursty,deferring", help="which traces to run (default: all three)")
    ap.add_argument("--backend", choices=("cpu-tiny", "emulated"), default="cpu-tiny",
                    help="cpu-tiny (default: tiny models on the CPU, SLO 2 s) or emulated (workers that sleep for the "
                         "A100 profile's batch times, confidences from the deferral curve, the cascade's SLO)")
    ap.add_argument("--gpus", type=int, default=2, help="workers (default 2)")
    ap.add_argument("--ray", action="store_true", help="serve with --ray local")
    args = ap.parse_args()
    wanted = [t.strip() for t in args.traces.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TRACES))
    if unknown or not wanted:
        sys.exit(f"--traces: unknown trace(s) {', '.join(unknown) or '(none given)'} (choose from {', '.join(TRACES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if args.ray:
        env.setdefault("RAY_AUTH_MODE", "disabled")
    cmd = [sys.executable, "-m", "diffsim.cli", "serve", "--backend", args.backend, "--cascade", "sdturbo-sdv15",
           "--gpus", str(args.gpus), "--port", "0", "--save-profile", str(out / f"{args.backend}-profile.yaml"),
           "--log-level", "warning"]
    if args.backend == "cpu-tiny":
        cmd += ["--slo-s", "2", "--discriminator-arch", "test_efficientnet", "--batch-sizes", "1,2,4"]
    if args.ray:
        cmd += ["--ray", "local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _wait_listening(proc, 600)
        if url is None:
            sys.exit(f"the server did not start: {proc.stderr.read()[-800:]}")
        plan = httpx.get(f"{url}/v1/plan", timeout=10).json()["plan"]
        capacity = plan["stages"][0]["capacity_qps"]
        print(f"server {url}: planned light capacity {capacity:.2f} qps ({plan['stages'][0]['workers']} light workers, "
              f"batch {plan['stages'][0]['batch_size']})", flush=True)
        rates = {"steady": args.steady * capacity, "bursty": args.bursty * capacity}
        if "deferring" in wanted:
            deferring = highest_deferring_demand(url, capacity)
            print(f"the server's policy defers up to {deferring:.2f} qps", flush=True)
            rates["deferring"] = args.deferring * deferring
        for name in wanted:
            if not rates[name] > 0:
                print(f"\n== {name}: skipped (no rate: the server's policy defers at no demand)", flush=True)
                continue
            spec = [TRACES[name][0], "--rate", f"{rates[name]:.3f}", *TRACES[name][1:]]
            trace = out / f"{name}.csv"
            if cli.main(["trace", *spec, "--duration", str(args.seconds), "--seed", "1", "--out", str(trace)]):
                sys.exit(f"could not write the {name} trace")
            print(f"\n== {name}: {' '.join(spec)} for {args.seconds:g} s; load average {_load()}", flush=True)
            if cli.main(["validate", "--url", url, "--trace", str(trace), "--out", str(out / name),
                         "--repeats", str(args.repeats)]):
                sys.exit(f"validate failed on the {name} trace")
            print(f"load average after {name}: {_load()}", flush=True)
    finally:
        stop_server(proc)


def highest_deferring_demand(url: str, capacity: float, step: float = 0.25) -> float:
    """The highest demand (qps, on a ``step`` grid up to ``capacity``) at which the server's policy, planning
    with the server's own profile and settings (``GET /v1/config``) and no queueing delay, still defers
    queries to the heavy model; 0 when it defers at none."""
    from diffsim.commands.validate import fetch_config, sim_config_from
    from diffsim.policies import PolicyInput, policy_for

    config = sim_config_from(fetch_config(url), service_time="p50")
    policy = policy_for(config)
    best = 0.0
    for k in range(1, int(capacity / step) + 1):
        plan = policy.plan(PolicyInput(demand_qps=k * step, queue_delay_s=(0.0, 0.0), gpus=config.gpus))
        if plan.feasible and plan.heavy.workers > 0 and plan.deferral_fraction > 0:
            best = k * step
    return best


def _load() -> str:
    """The 1, 5 and 15 min load averages, with the CPU count."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
