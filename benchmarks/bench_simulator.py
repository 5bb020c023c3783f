"""How fast the simulator runs and how much memory it holds, against the targets of issue 15.

Policy ``diffserve`` on the A100 profile, cascade ``sdturbo-sdv15``, least-loaded routing, Poisson
arrivals at 200 qps per 256 GPUs. Times are CPU seconds (``time.process_time``): on a shared machine
wall time measures the neighbours. Printed, in order:

1. bare SimPy: the event rate of processes that do nothing but wait on timeouts, measured in this run --
   the ceiling any SimPy model's event rate is compared with;
2. the shipped dynamic trace on 16 GPUs (as before);
3. 1 h at 200 qps on 256 GPUs (720k requests), run as ``diffsim simulate`` runs it (queries.csv written
   as queries end, then summary.json, timeseries.csv and plans.csv): CPU seconds in all and by part,
   and the simulator's events/s as a fraction of bare SimPy's (target >= 0.3; <= 10 s CPU in all);
4. the cost per request at 16, 64, 256 and 1024 GPUs (same load per GPU, ~100k requests each; target:
   flat within 1.5x);
5. peak RSS of a fresh process that generates a trace of 1M requests and simulates it as ``diffsim
   simulate`` does (and of 10M with ``--big``: target < 1.5 GB and < 3 min);
6. idle time (issue 14): two requests 10^3 s and 10^6 s apart, the simulation's events, policy calls and
   CPU time (target: the same for both; the demand rows and plans of the gap are still all there).

    .venv/bin/python benchmarks/bench_simulator.py            # 1-5 with 1M requests (~2 min on 2 cores)
    .venv/bin/python benchmarks/bench_simulator.py --big      # also 10M requests (several more minutes)
    .venv/bin/python benchmarks/bench_simulator.py --small    # 1, 2 and 6 only
    .venv/bin/python benchmarks/bench_simulator.py --profile  # also cProfile the dynamic-trace run (top 20)
    .venv/bin/python benchmarks/bench_simulator.py --instructions  # instruction counts instead (valgrind)

``--instructions`` counts instructions (valgrind's callgrind) instead of timing: bare SimPy's per event,
and the simulator's per event and per request on 2 minutes of the 1 h run's load (allocator apart),
alone and as ``diffsim simulate`` runs it. CPU times on a machine others share move by a quarter
from run to run; instruction counts repeat to a few in 10,000, so two commits compare exactly (memory
stalls are not counted: a ratio of instructions is not a ratio of times, only its direction is).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import simpy

from diffsim.config import SimConfig
from diffsim.policies import make_policy
from diffsim.profiles import load_cascade
from diffsim.reports import metrics
from diffsim.reports.comparison import summarize_result
from diffsim.resources import profiles_dir, resolve_profile, traces_dir
from diffsim.simulator import simulate
from diffsim.workload.traces import Trace

QPS_PER_GPU = 200 / 256  # the load of the 1 h run, kept when the GPU count changes


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
        self.reads_peak_demand = policy.reads_peak_demand
        self.cpu_s = 0.0

    def plan(self, inp):
        c0 = time.process_time()
        try:
            return self.policy.plan(inp)
        finally:
            self.cpu_s += time.process_time() - c0


def bare_simpy_rate(events: int = 300_000, processes: int = 256, repeats: int = 3) -> float:
    """Events per CPU second of SimPy alone: processes that only wait on timeouts (each timeout is one
    event and one process resumption, as a simulated batch is). The median of ``repeats`` runs."""
    return sorted(_bare_simpy_run(events, processes) for _ in range(repeats))[repeats // 2]


def _bare_simpy_run(events: int, processes: int) -> float:
    env = simpy.Environment()
    per_process = events // processes

    def waiter(delay: float):
        for _ in range(per_process):
            yield env.timeout(delay)

    for i in range(processes):
        env.process(waiter(1.0 + i / processes))
    cpu0 = time.process_time()
    env.run()
    # Besides its timeouts, each process has a start and an end event.
    return (processes * (per_process + 2)) / (time.process_time() - cpu0)


def simulate_as_cli(config: SimConfig, trace: Trace, out: Path, policy=None) -> tuple[object, dict]:
    """Simulate and write the outputs as ``diffsim simulate`` does (no plot); CPU seconds by part."""
    cpu0 = time.process_time()
    with metrics.QueryCsv(out / metrics.QUERIES_FILE) as query_csv:
        result = simulate(config, trace, policy=policy, keep_queries=False, on_query=query_csv.write)
    cpu1 = time.process_time()
    summary = summarize_result(result, "bench")
    rows = metrics.timeseries(result.queries, result.plans, result.demand, cascade=config.cascade,
                              window_s=config.window_s)
    metrics.write_outputs(out, summary, rows, plot=False)
    metrics.write_csv(out / metrics.PLANS_FILE, metrics.plan_rows(result.plans), metrics.PLAN_COLUMNS)
    cpu2 = time.process_time()
    return result, {"simulate_and_queries_csv": cpu1 - cpu0, "summary_and_files": cpu2 - cpu1, "total": cpu2 - cpu0}


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


def diffserve(config: SimConfig) -> CpuTimedPolicy:
    return CpuTimedPolicy(make_policy(config.policy, config.cascade, batch_sizes=config.batch_sizes))


def bench_large(cascade, rate: float, duration: float, gpus: int, bare: float) -> None:
    """Item 3: the issue's 1 h run, the simulator alone and then as the command runs it."""
    trace = large_trace(rate, duration)
    config = SimConfig(cascade=cascade, gpus=gpus, policy="diffserve", seed=0)
    policy = diffserve(config)
    cpu0 = time.process_time()
    result = simulate(config, trace, policy=policy, keep_queries=False)
    sim_cpu = time.process_time() - cpu0 - policy.cpu_s
    events_rate = result.events / sim_cpu
    print(f"\n{duration:g} s at {rate:g} qps on {gpus} GPUs: {len(trace):,} requests, {result.events:,} events")
    print(f"  simulator alone (no outputs, allocator apart): {sim_cpu:.2f} s CPU, {events_rate:,.0f} events/s = "
          f"{events_rate / bare:.2f} of bare SimPy (target >= 0.30); {1e6 * sim_cpu / len(trace):.1f} us/request; "
          f"allocator {policy.cpu_s:.2f} s in {result.policy_calls} calls")
    policy = diffserve(config)
    with tempfile.TemporaryDirectory() as tmp:
        result, cpu = simulate_as_cli(config, trace, Path(tmp), policy)
    with_outputs = cpu["total"] - policy.cpu_s
    print(f"  as diffsim simulate: {cpu['total']:.2f} s CPU in all (target <= 10 s) = simulation and streamed "
          f"queries.csv {cpu['simulate_and_queries_csv']:.2f} s (allocator {policy.cpu_s:.2f} s of it) + summary, "
          f"time series and files {cpu['summary_and_files']:.2f} s; without the allocator {with_outputs:.2f} s, "
          f"{result.events / with_outputs:,.0f} events/s = {result.events / with_outputs / bare:.2f} of bare SimPy")


def bench_scaling(cascade, gpu_counts=(16, 64, 256, 1024), requests: int = 100_000, repeats: int = 3) -> None:
    """Item 4: the cost per request as the cluster grows, at the same load per GPU; each the best of
    ``repeats`` runs (the least disturbed by the rest of the machine)."""
    print(f"\ncost per request, {requests:,} requests at {QPS_PER_GPU * 256:g} qps per 256 GPUs (no outputs, "
          f"best of {repeats}):")
    costs = []
    for gpus in gpu_counts:
        rate = QPS_PER_GPU * gpus
        trace = large_trace(rate, requests / rate)
        config = SimConfig(cascade=cascade, gpus=gpus, policy="diffserve", seed=0)
        runs = []
        for _ in range(repeats):
            policy = diffserve(config)
            cpu0 = time.process_time()
            result = simulate(config, trace, policy=policy, keep_queries=False)
            runs.append((time.process_time() - cpu0, policy))
        cpu, policy = min(runs, key=lambda run: run[0] - run[1].cpu_s)
        us = 1e6 * (cpu - policy.cpu_s) / len(trace)
        costs.append(us)
        print(f"  {gpus:5d} GPUs: {us:6.1f} us/request simulator alone, {1e6 * cpu / len(trace):6.1f} with the "
              f"allocator ({policy.cpu_s:.2f} s in {result.policy_calls} calls); {result.events / len(trace):.2f} "
              f"events/request")
    print(f"  largest / smallest: {max(costs) / min(costs):.2f}x (target <= 1.5x)")


def peak_rss_kb() -> int:
    """This process's peak resident set. Linux: VmHWM, the peak of this program's own memory;
    ru_maxrss would also count the parent's peak, which a child inherits through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_child(requests: int) -> None:
    """In a fresh process: generate the trace, simulate it as the command does, report peak RSS (JSON)."""
    started = time.perf_counter()
    base_kb = peak_rss_kb()
    cascade = load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")
    trace = large_trace(200.0, requests / 200.0)
    trace_kb = peak_rss_kb()
    config = SimConfig(cascade=cascade, gpus=256, policy="diffserve", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        result, cpu = simulate_as_cli(config, trace, Path(tmp))
        csv_bytes = (Path(tmp) / metrics.QUERIES_FILE).stat().st_size
    print(json.dumps({"requests": len(trace), "peak_kb": peak_rss_kb(),
                      "imports_kb": base_kb, "trace_kb": trace_kb, "cpu_s": cpu["total"], "csv_bytes": csv_bytes,
                      "wall_s": time.perf_counter() - started, "events": result.events}))


def bench_rss(requests: int) -> None:
    """Item 5: peak RSS of a fresh process simulating ``requests`` requests (256 GPUs, 200 qps)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", str(requests)],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"the {requests:,}-request run failed")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 1 / 1024
    per_request = (r["peak_kb"] - r["trace_kb"]) * 1024 / r["requests"]
    print(f"\n{r['requests']:,} requests on 256 GPUs, as diffsim simulate (fresh process): peak RSS "
          f"{r['peak_kb'] * mb:,.0f} MB (target < 1,536 MB) -- imports {r['imports_kb'] * mb:,.0f} MB, with the "
          f"trace {r['trace_kb'] * mb:,.0f} MB, {per_request:,.0f} bytes/request beyond; {r['cpu_s']:.1f} s CPU "
          f"for simulation and outputs, {r['wall_s']:.1f} s wall in all (target < 180 s); queries.csv "
          f"{r['csv_bytes'] / 2**20:,.0f} MB")


def bench_idle(cascade) -> None:
    """Item 6: a long idle gap costs what a short one does (the controller skips idle ticks)."""
    print("\nidle time: two requests a gap apart, 16 GPUs (simulation only; outputs are a row per tick/window)")
    for gap in (1e3, 1e6):
        trace = Trace(arrival_s=np.array([0.5, 0.5 + gap]), prompt_id=np.array([1, 2]))
        config = SimConfig(cascade=cascade, gpus=16, policy="diffserve", seed=0)
        policy = diffserve(config)
        cpu0 = time.process_time()
        result = simulate(config, trace, policy=policy, keep_queries=False)
        cpu = time.process_time() - cpu0
        print(f"  gap {gap:>9,.0f} s: {result.events} events, {result.policy_calls} policy calls, {cpu:.3f} s CPU "
              f"({len(result.demand):,} demand rows, {len(result.plans):,} plans)")


def _callgrind_total(pid: str) -> int:
    """Instructions callgrind has counted in process ``pid`` so far."""
    out = subprocess.run(["callgrind_control", "-e", "Ir", pid], capture_output=True, text=True, check=True).stdout
    return int(out.split("Th 1")[1].split()[0].replace(",", ""))


def instructions_child(duration_s: float) -> None:
    """Under callgrind (instrumentation off at the start): count instructions of bare SimPy and of the
    simulation, the allocator's left out; report them as JSON."""
    pid = str(os.getpid())
    count = lambda: _callgrind_total(pid)  # noqa: E731
    cascade = load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")
    trace = large_trace(200.0, duration_s)
    config = SimConfig(cascade=cascade, gpus=256, policy="diffserve", seed=0)

    class CountedPolicy(CpuTimedPolicy):  # the allocator's instructions, to take them out
        def plan(self, inp):
            before = count()
            try:
                return self.policy.plan(inp)
            finally:
                self.cpu_s += count() - before

    _bare_simpy_run(20_000, 256)  # warm: imports and caches outside the counts
    simulate(config, large_trace(200.0, 10.0), keep_queries=False)
    subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=True)
    c0 = count()
    _bare_simpy_run(50_000, 256)
    bare = (count() - c0) / (256 * (50_000 // 256 + 2))
    policy = CountedPolicy(make_policy(config.policy, cascade, batch_sizes=config.batch_sizes))
    c0 = count()
    result = simulate(config, trace, policy=policy, keep_queries=False)
    alone = count() - c0 - policy.cpu_s
    policy = CountedPolicy(make_policy(config.policy, cascade, batch_sizes=config.batch_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        c0 = count()
        simulate_as_cli(config, trace, Path(tmp), policy)
        cli = count() - c0 - policy.cpu_s
    print(json.dumps({"requests": len(trace), "events": result.events, "bare_per_event": bare,
                      "alone": alone, "cli": cli}))


def bench_instructions(duration_s: float) -> None:
    """``--instructions``: run :func:`instructions_child` under callgrind and print its counts."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("--instructions needs valgrind (callgrind) on the PATH")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                               f"--callgrind-out-file={tmp}/callgrind.out", sys.executable,
                               os.path.abspath(__file__), "--instructions-child", str(duration_s)],
                              capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit("the callgrind run failed")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    n, events = r["requests"], r["events"]
    per_event = r["alone"] / events
    print(f"instructions (callgrind), {duration_s:g} s at 200 qps on 256 GPUs: {n:,} requests, {events:,} events; "
          f"the allocator's left out")
    print(f"  bare SimPy: {r['bare_per_event']:,.0f} per event")
    print(f"  simulator alone: {r['alone'] / n:,.0f} per request, {per_event:,.0f} per event = "
          f"{r['bare_per_event'] / per_event:.2f} of bare SimPy's events per instruction")
    outputs = (r["cli"] - r["alone"]) / n
    print(f"  as diffsim simulate: {r['cli'] / n:,.0f} per request ({outputs:,.0f} for queries.csv, the summary "
          f"and the files)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="only bare SimPy, the dynamic trace on 16 GPUs and idle time")
    p.add_argument("--big", action="store_true", help="also the peak RSS of 10M requests (minutes)")
    p.add_argument("--profile", action="store_true", help="cProfile the dynamic-trace run")
    p.add_argument("--rate", type=float, default=200.0, help="large run: queries/s (default 200)")
    p.add_argument("--duration", type=float, default=3600.0, help="large run: seconds (default 3600)")
    p.add_argument("--gpus", type=int, default=256, help="large run: GPUs (default 256)")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions with valgrind's callgrind instead of timing (exact from run to run)")
    p.add_argument("--rss-child", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--instructions-child", type=float, metavar="S", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    if args.instructions_child:
        instructions_child(args.instructions_child)
        return 0
    if args.instructions:
        bench_instructions(120.0)
        return 0
    bare = bare_simpy_rate()
    print(f"bare SimPy: {bare:,.0f} events/s (CPU), processes waiting on timeouts")
    cascade = load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")
    bench("dynamic trace", dynamic_trace(), 16, cascade, profile=args.profile)
    bench_idle(cascade)
    if args.small:
        return 0
    bench_large(cascade, args.rate, args.duration, args.gpus, bare)
    bench_scaling(cascade)
    bench_rss(1_000_000)
    if args.big:
        bench_rss(10_000_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
