"""Allocator solve time, both solvers (exact and MILP), 16 to 1024 GPUs, cold and warm.

For each shipped cascade and a sweep of demands (default grid: 201 thresholds, 6 batch sizes) it times
``allocate`` with each solver and prints median and p90, each also as a ratio to a trivial scipy ``milp``
call measured in the same process, so the figures compare across machines.

* warm: the cascade's ranked threshold candidates are already memoised (what a controller sees every tick);
* cold: the first solve for a cascade, as in a fresh process: the memo is emptied before each timed call,
  so the call includes ranking the candidates. (Process-wide one-off costs, such as imports, are not in it.)

    python benchmarks/bench_allocator.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.optimize import LinearConstraint, milp

import diffsim.allocator as allocator
from diffsim.allocator import allocate
from diffsim.profiles import load_cascade

ROOT = Path(__file__).resolve().parent.parent
CASCADES = ("sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl")
DEMANDS_16 = (1, 4, 8, 12, 16, 20, 24, 28, 32, 40)  # queries/s on 16 GPUs; scaled with the GPU count
DEMANDS_1024 = (50, 200, 600, 1000, 1400)
# (GPUs, demands, objective, mode)
SETTINGS = (
    (16, DEMANDS_16, "quality", "cascade"),
    (16, DEMANDS_16, "max-threshold", "cascade"),
    (16, DEMANDS_16, "quality", "split"),
    (64, tuple(4 * d for d in DEMANDS_16), "quality", "cascade"),
    (64, tuple(4 * d for d in DEMANDS_16), "max-threshold", "cascade"),
    (256, tuple(16 * d for d in DEMANDS_16), "quality", "cascade"),
    (256, tuple(16 * d for d in DEMANDS_16), "max-threshold", "cascade"),
    (1024, DEMANDS_1024, "quality", "cascade"),
    (1024, DEMANDS_1024, "max-threshold", "cascade"),
)


def trivial_milp_ms(n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        milp(np.array([1.0, 1.0]), integrality=np.ones(2),
             constraints=LinearConstraint(np.array([[1.0, 2.0]]), 1, np.inf))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench(cascades, gpus: int, demands, objective: str, mode: str, solver: str, cold: bool, repeat: int):
    times = []
    for cascade in cascades:
        allocate(cascade, gpus, demands[0], objective=objective, mode=mode, solver=solver)  # memo filled
        for d in demands:
            for _ in range(repeat):
                if cold:
                    allocator._MEMO.clear()
                t = time.perf_counter()
                allocate(cascade, gpus, d, objective=objective, mode=mode, solver=solver)
                times.append((time.perf_counter() - t) * 1e3)
    return times


def stats(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says
    except (AttributeError, OSError):
        pass
    cascades = [load_cascade(n, ROOT / "profiles/a100.yaml", ROOT / "profiles/cascades.yaml") for n in CASCADES]
    for solver in ("exact", "milp"):
        allocate(cascades[0], 16, 1.0, solver=solver)  # first calls in the process: imports, HiGHS start-up
    trivial = trivial_milp_ms()
    print(f"trivial scipy milp call: median {trivial:.3f} ms (one core); every ratio below is to it")
    print(f"{'setting':<36} {'solver':<6} {'warm median':>12} {'warm p90':>10} {'cold median':>12} {'cold p90':>10}"
          f"   ratios (warm med / p90, cold med / p90)")
    for gpus, demands, objective, mode in SETTINGS:
        label = f"{gpus} GPUs, {mode}, {objective}"
        for solver in ("exact", "milp"):
            warm = stats(bench(cascades, gpus, demands, objective, mode, solver, False, args.repeat))
            cold = stats(bench(cascades, gpus, demands, objective, mode, solver, True, args.repeat))
            ratios = " / ".join(f"{v / trivial:.3f}" for v in warm) + ", " + " / ".join(f"{v / trivial:.3f}" for v in cold)
            print(f"{label:<36} {solver:<6} {warm[0]:9.3f} ms {warm[1]:7.3f} ms {cold[0]:9.3f} ms {cold[1]:7.3f} ms"
                  f"   {ratios}")


if __name__ == "__main__":
    main()
