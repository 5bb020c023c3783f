"""How far the simulator predicts the real server, on cpu-tiny: ``diffsim validate`` on two traces.

Starts ``diffsim serve --backend cpu-tiny`` (2 workers, SLO 2 s, the start-up profile measured on both
workers at once) in a process of its own, reads its planned capacity, and validates the simulator against
it on a steady Poisson trace at ~70% of that capacity and a bursty one (Gamma gaps, cv 3) above it, each
replayed ``--repeats`` times for the real system's own spread (validate simulates each real run from its
own start state, with the batch times and request overhead measured in it). Prints validate's tables and
the machine's load average before and after each trace (the figures move with it on a shared machine);
writes validate's reports under ``--out``.

    .venv/bin/python benchmarks/bench_fidelity.py --out out/fidelity           # ~15 min on 2 cores
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each trace (default 60)")
    ap.add_argument("--repeats", type=int, default=3, help="real runs per trace (default 3)")
    ap.add_argument("--steady", type=float, default=0.7, help="steady trace's rate, x capacity (default 0.7)")
    ap.add_argument("--bursty", type=float, default=1.1, help="bursty trace's mean rate, x capacity (default 1.1)")
    ap.add_argument("--ray", action="store_true", help="serve with --ray local")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if args.ray:
        env.setdefault("RAY_AUTH_MODE", "disabled")
    cmd = [sys.executable, "-m", "diffsim.cli", "serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15",
           "--gpus", "2", "--port", "0", "--slo-s", "2", "--discriminator-arch", "test_efficientnet",
           "--batch-sizes", "1,2,4", "--save-profile", str(out / "cpu-tiny-measured.yaml"), "--log-level", "warning"]
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
        traces = {
            "steady": ["poisson", "--rate", f"{args.steady * capacity:.3f}"],
            "bursty": ["gamma", "--rate", f"{args.bursty * capacity:.3f}", "--cv", "3"],
        }
        for name, spec in traces.items():
            trace = out / f"{name}.csv"
            cli.main(["trace", *spec, "--duration", str(args.seconds), "--seed", "1", "--out", str(trace)])
            print(f"\n== {name}: {' '.join(spec)} for {args.seconds:g} s; load average {_load()}", flush=True)
            cli.main(["validate", "--url", url, "--trace", str(trace), "--out", str(out / name),
                      "--repeats", str(args.repeats)])
            print(f"load average after {name}: {_load()}", flush=True)
    finally:
        stop_server(proc)


def _load() -> str:
    """The 1, 5 and 15 min load averages, with the CPU count."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
