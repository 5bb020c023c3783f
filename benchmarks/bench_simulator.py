"""How fast the simulator runs: the shipped dynamic trace on 16 GPUs, and 1 h at 200 qps on 256 GPUs.

Policy ``diffserve`` on the A100 profile, cascade ``sdturbo-sdv15``. For each run it prints the wall
time (and the part spent in the policy's allocator, reported apart), SimPy events per second, requests
simulated per second of wall time, and the speed-up over real time (simulated seconds / wall seconds).

    .venv/bin/python benchmarks/bench_simulator.py            # both runs
    .venv/bin/python benchmarks/bench_simulator.py --small    # the dynamic trace only
    .venv/bin/python benchmarks/bench_simulator.py --profile  # also cProfile the small run (top 20)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import Counter

import numpy as np

from diffsim.config import SimConfig
from diffsim.policies import make_policy
from diffsim.profiles import load_cascade
from diffsim.resources import profiles_dir, resolve_profile, traces_dir
from diffsim.simulator import simulate
from diffsim.workload.traces import Trace


def dynamic_trace() -> Trace:
    path = traces_dir() / "dynamic.csv"
    if path.exists():
        from diffsim.workload.traces import read_trace

        return read_trace(path)
    # The same recipe as the shipped file (traces/README.md): diurnal shape, 360 x 1 s, [12, 32] qps.
    from diffsim.workload.trace_generators import diurnal_shape, shape_trace

    return shape_trace(diurnal_shape(360), 12, 32, interval_s=1.0, seed=0)


def large_trace(rate_qps: float, duration_s: float, seed: int = 0) -> Trace:
    try:
        from diffsim.workload.trace_generators import poisson_trace
    except ImportError:  # a numpy fallback with the same meaning
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1 / rate_qps, int(rate_qps * duration_s * 1.1) + 100)
        arrival = np.cumsum(gaps)
        arrival = arrival[arrival < duration_s]
        return Trace(arrival_s=arrival, prompt_id=rng.integers(1, 5000, len(arrival)))
    return poisson_trace(rate_qps, duration_s, seed=seed)


class CpuTimedPolicy:
    """The configured policy, with the CPU time of its calls added up (wall time is unreliable on a busy
    machine; CPU time is not)."""

    def __init__(self, policy):
        self.policy = policy
        self.name = policy.name
        self.cpu_s = 0.0

    def plan(self, inp):
        c0 = time.process_time()
        try:
            return self.policy.plan(inp)
        finally:
            self.cpu_s += time.process_time() - c0


def bench(name: str, trace: Trace, gpus: int, cascade, profile: bool = False) -> None:
    config = SimConfig(cascade=cascade, gpus=gpus, policy="diffserve", seed=0)
    policy = CpuTimedPolicy(make_policy(config.policy, cascade, batch_sizes=config.batch_sizes))
    cpu0 = time.process_time()
    if profile:
        prof = cProfile.Profile()
        result = prof.runcall(simulate, config, trace, policy=policy)
    else:
        result = simulate(config, trace, policy=policy)
    cpu = time.process_time() - cpu0
    sim_wall = result.wall_s - result.policy_s
    sim_cpu = cpu - policy.cpu_s
    outcomes = Counter(q.outcome for q in result.queries)
    print(f"{name}: {len(trace):,} requests, {gpus} GPUs, {result.duration_s:,.0f} s simulated")
    print(f"  wall {result.wall_s:.2f} s, of which policy/allocator {result.policy_s:.2f} s in {result.policy_calls} "
          f"calls; simulator alone {sim_wall:.2f} s")
    print(f"  cpu {cpu:.2f} s, of which policy/allocator {policy.cpu_s:.2f} s; simulator alone {sim_cpu:.2f} s")
    print(f"  {result.events:,} events: {result.events / sim_wall:,.0f} events/s, "
          f"{len(trace) / sim_wall:,.0f} requests/s of wall time (simulator alone), "
          f"speed-up over real time {result.duration_s / result.wall_s:,.0f}x "
          f"({result.duration_s / sim_wall:,.0f}x without the allocator)")
    print(f"  outcomes: {dict(outcomes)}; served light {sum(q.served_by == 'light' for q in result.queries):,}")
    if profile:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="only the dynamic trace on 16 GPUs")
    p.add_argument("--profile", action="store_true", help="cProfile the dynamic-trace run")
    p.add_argument("--rate", type=float, default=200.0, help="large run: queries/s (default 200)")
    p.add_argument("--duration", type=float, default=3600.0, help="large run: seconds (default 3600)")
    p.add_argument("--gpus", type=int, default=256, help="large run: GPUs (default 256)")
    args = p.parse_args(argv)
    cascade = load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")
    bench("dynamic trace", dynamic_trace(), 16, cascade, profile=args.profile)
    if not args.small:
        bench(f"{args.duration:g} s at {args.rate:g} qps", large_trace(args.rate, args.duration), args.gpus, cascade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
