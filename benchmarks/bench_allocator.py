"""Allocator solve time: 16 GPUs (the paper's testbed) and 1024 GPUs.

Solves the MILP for each shipped cascade over a sweep of demands with the default grid (201 thresholds,
6 batch sizes) and prints median / p90 / max solve time, and the ratio to a trivial scipy ``milp`` call
measured in the same process (so the figure can be compared across machines).

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

from diffsim.allocator import allocate
from diffsim.profiles import load_cascade

ROOT = Path(__file__).resolve().parent.parent
CASCADES = ("sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl")


def trivial_milp_ms(n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        milp(np.array([1.0, 1.0]), integrality=np.ones(2),
             constraints=LinearConstraint(np.array([[1.0, 2.0]]), 1, np.inf))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench(gpus: int, demands, objective: str, mode: str, repeat: int) -> list[float]:
    times = []
    for name in CASCADES:
        cascade = load_cascade(name, ROOT / "profiles/a100.yaml", ROOT / "profiles/cascades.yaml")
        for d in demands:
            for _ in range(repeat):
                t = time.perf_counter()
                allocate(cascade, gpus, d, objective=objective, mode=mode)
                times.append((time.perf_counter() - t) * 1e3)
    return times


def summary(label: str, times: list[float], trivial: float) -> None:
    times = sorted(times)
    p90 = times[int(0.9 * (len(times) - 1))]
    med = statistics.median(times)
    print(f"{label:<42} n={len(times):4d}  median {med:7.2f} ms  p90 {p90:7.2f} ms  max {times[-1]:7.2f} ms"
          f"  ({med / trivial:5.1f}x a trivial milp)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says
    except (AttributeError, OSError):
        pass
    allocate(load_cascade(CASCADES[0], ROOT / "profiles/a100.yaml", ROOT / "profiles/cascades.yaml"), 16, 1.0)
    trivial = trivial_milp_ms()
    print(f"trivial scipy milp call: median {trivial:.2f} ms (one core)")
    demands16 = [1, 4, 8, 12, 16, 20, 24, 28, 32, 40]
    for objective in ("quality", "max-threshold"):
        summary(f"16 GPUs, cascade, {objective}", bench(16, demands16, objective, "cascade", args.repeat), trivial)
    summary("16 GPUs, split (Proteus), quality", bench(16, demands16, "quality", "split", args.repeat), trivial)
    demands1024 = [50, 200, 600, 1000, 1400]
    summary("1024 GPUs, cascade, quality", bench(1024, demands1024, "quality", "cascade", 1), trivial)
    summary("1024 GPUs, cascade, max-threshold", bench(1024, demands1024, "max-threshold", "cascade", 1), trivial)


if __name__ == "__main__":
    main()
