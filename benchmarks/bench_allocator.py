"""Allocator solve time, both solvers (exact and MILP), 16 to 1024 GPUs, cold and warm, with the constant
queueing delay and with the plan-dependent one.

For each shipped cascade and a sweep of demands (default grid: 201 thresholds, 6 batch sizes) it times
``allocate`` with each solver and prints median and p90, each also as a ratio to a trivial scipy ``milp``
call measured in the same process, so the figures compare across machines. Times are the process's CPU
time (``time.process_time``): on a shared machine, wall time also counts the waits for a core.

* warm: the cascade's ranked threshold candidates are already memoised (what a controller sees every tick);
* cold: the first solve for a cascade, as ``diffsim plan`` does in a fresh process: the memo is emptied
  before each timed call, so the call includes ranking the candidates. (Process-wide one-off costs, such as
  imports, are not in it.) The target: a cold exact solve below one trivial ``milp`` call. Also timed in
  fresh processes: the first solve and, for comparison, the first trivial ``milp`` call of a process.
* plan-dependent delay (``queue_model`` mean / tail, random / least-loaded routing, with and without a
  backlog): the exact solver at 16 to 1024 GPUs (warm), and the MILP at 16 GPUs, the size it is meant for.

``--baseline REV`` also times the allocator as it was at git revision REV (its ``diffsim/allocator.py``,
loaded beside the current one), call for call alternating with the current one, and prints the ratios:
before/after figures from one run on a shared, noisy machine.

    python benchmarks/bench_allocator.py [--repeat N] [--baseline REV] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import LinearConstraint, milp

import diffsim.allocator as allocator
from diffsim.profiles import load_cascade

ROOT = Path(__file__).resolve().parent.parent
clock = time.process_time  # CPU time of this process, ns resolution
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
# Plan-dependent delay: demands per 16 GPUs (scaled), and the backlogs (light, heavy queued) tried at each.
QUEUED_DEMANDS_16 = (4, 12, 20, 28, 36)
QUEUED_GPUS = (16, 64, 256, 1024)
BACKLOGS = ((0, 0), (5, 20))
QUEUED_MODELS = (("mean", "random"), ("mean", "least-loaded"), ("tail", "random"), ("tail", "least-loaded"))


def trivial_milp_ms(n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = clock()
        milp(np.array([1.0, 1.0]), integrality=np.ones(2),
             constraints=LinearConstraint(np.array([[1.0, 2.0]]), 1, np.inf))
        times.append((clock() - t) * 1e3)
    return statistics.median(times)


# Fresh processes: the first call after imports, as ``diffsim plan`` makes it (imports and loading the
# profiles are not timed; numpy's and HiGHS's first-call costs are).
FRESH_ALLOCATE = """
import sys, time
import diffsim.allocator as allocator
from diffsim.profiles import load_cascade
cascade = load_cascade(sys.argv[1], sys.argv[2], sys.argv[3])
t = time.process_time()
allocator.allocate(cascade, 16, 20.0)
print((time.process_time() - t) * 1e3)
"""
FRESH_MILP = """
import time
import numpy as np
from scipy.optimize import LinearConstraint, milp
t = time.process_time()
milp(np.array([1.0, 1.0]), integrality=np.ones(2), constraints=LinearConstraint(np.array([[1.0, 2.0]]), 1, np.inf))
print((time.process_time() - t) * 1e3)
"""


def fresh_process_ms(code: str, args: tuple = (), runs: int = 5) -> float:
    """Median over ``runs`` fresh Python processes of the time ``code`` prints (ms)."""
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def load_baseline(rev: str):
    """``diffsim/allocator.py`` at git revision ``rev`` as a module beside the current one (its relative
    imports pointed at the installed ``diffsim``)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:diffsim/allocator.py"], check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from .", "from diffsim.")
    path = Path(tempfile.mkdtemp()) / "baseline_allocator.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_allocator", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_allocator"] = module
    spec.loader.exec_module(module)
    return module


def timed(modules, cases, cold: bool, repeat: int) -> list[list[float]]:
    """Milliseconds per call, per module: each case ``(cascade, gpus, demand, kwargs)`` solved by every
    module in turn (alternating, so that load on the machine falls on all alike)."""
    times: list[list[float]] = [[] for _ in modules]
    for cascade, gpus, demand, kwargs in cases:
        for module in modules:
            module.allocate(cascade, gpus, demand, **kwargs)  # memo filled
        for _ in range(repeat):
            for module, out in zip(modules, times):
                if cold:
                    module._MEMO.clear()
                t = clock()
                module.allocate(cascade, gpus, demand, **kwargs)
                out.append((clock() - t) * 1e3)
    return times


def stats(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="also time the allocator at this git revision, alternating")
    ap.add_argument("--quick", action="store_true", help="16 and 1024 GPUs only, one repeat")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says
    except (AttributeError, OSError):
        pass
    cascades = [load_cascade(n, ROOT / "profiles/a100.yaml", ROOT / "profiles/cascades.yaml") for n in CASCADES]
    modules = [allocator] + ([load_baseline(args.baseline)] if args.baseline else [])
    for module in modules:
        for solver in ("exact", "milp"):
            module.allocate(cascades[0], 16, 1.0, solver=solver)  # first calls in the process: imports, HiGHS
            module.allocate(cascades[0], 16, 1.0, solver=solver, queue_model="tail")
    trivial = trivial_milp_ms()
    print(f"trivial scipy milp call: median {trivial:.3f} ms CPU (one core); every ratio below is to it")
    if args.baseline:
        print(f"'was': the allocator at {args.baseline}, timed call for call alternating with the current one")

    print("\nconstant queueing delay (queue_model little, the default)")
    print(f"{'setting':<36} {'solver':<6} {'warm median':>12} {'warm p90':>10} {'cold median':>12} {'cold p90':>10}"
          f"   ratios (warm med / p90, cold med / p90)")
    settings = [s for s in SETTINGS if not args.quick or s[0] in (16, 1024)]
    for gpus, demands, objective, mode in settings:
        label = f"{gpus} GPUs, {mode}, {objective}"
        for solver in ("exact", "milp"):
            kwargs = dict(objective=objective, mode=mode, solver=solver)
            cases = [(c, gpus, d, kwargs) for c in cascades for d in demands]
            warm = [stats(t) for t in timed(modules, cases, False, repeat)]
            cold = [stats(t) for t in timed(modules, cases, True, repeat)]
            ratios = " / ".join(f"{v / trivial:.3f}" for v in warm[0]) + ", " + " / ".join(
                f"{v / trivial:.3f}" for v in cold[0])
            print(f"{label:<36} {solver:<6} {warm[0][0]:9.3f} ms {warm[0][1]:7.3f} ms {cold[0][0]:9.3f} ms"
                  f" {cold[0][1]:7.3f} ms   {ratios}")
            if args.baseline:
                print(f"{'  was':<36} {solver:<6} {warm[1][0]:9.3f} ms {warm[1][1]:7.3f} ms {cold[1][0]:9.3f} ms"
                      f" {cold[1][1]:7.3f} ms   cold median {cold[1][0] / cold[0][0]:.1f}x now")
            if (gpus, objective, mode, solver) == (16, "quality", "cascade", "exact"):
                cold_16 = cold[0][0]
    print(f"\ncold exact solve, 16 GPUs, quality: median {cold_16:.3f} ms = {cold_16 / trivial:.2f}x a trivial milp "
          f"call (target: below 1x)")
    paths = (CASCADES[0], str(ROOT / "profiles/a100.yaml"), str(ROOT / "profiles/cascades.yaml"))
    first_solve, first_milp = fresh_process_ms(FRESH_ALLOCATE, paths), fresh_process_ms(FRESH_MILP)
    print(f"first call in a fresh process (median of 5; numpy's and HiGHS's first-call costs in): exact solve "
          f"{first_solve:.2f} ms = {first_solve / trivial:.2f}x the trivial milp call above, "
          f"{first_solve / first_milp:.2f}x a trivial milp call that is the first in its process ({first_milp:.2f} ms)")

    print("\nplan-dependent queueing delay (queue_model mean / tail), warm; backlogs (light, heavy queued): "
          f"{', '.join(str(b) for b in BACKLOGS)}")
    print(f"{'setting':<36} {'solver':<6} {'median':>9} {'p90':>9} {'max':>9}   ratios (median / p90)")
    sizes = [g for g in QUEUED_GPUS if not args.quick or g in (16, 1024)]
    for gpus in sizes + ["milp"]:
        solver = "milp" if gpus == "milp" else "exact"
        gpus = 16 if gpus == "milp" else gpus
        demands = QUEUED_DEMANDS_16 if solver == "exact" else QUEUED_DEMANDS_16[1:4]
        for model, routing in QUEUED_MODELS if solver == "exact" else QUEUED_MODELS[:3:2]:
            kwargs = dict(queue_model=model, routing=routing, solver=solver)
            cases = [(c, gpus, d * gpus / 16, {**kwargs, "backlog": b}) for c in cascades for d in demands
                     for b in BACKLOGS]
            times = timed(modules, cases, False, 1 if solver == "milp" else repeat)
            med, p90 = stats(times[0])
            label = f"{gpus} GPUs, {model}, {routing}"
            print(f"{label:<36} {solver:<6} {med:6.2f} ms {p90:6.2f} ms {max(times[0]):6.1f} ms"
                  f"   {med / trivial:.2f} / {p90 / trivial:.2f}")
            if args.baseline:
                was_med, was_p90 = stats(times[1])
                speedups = [w / n for w, n in zip(times[1], times[0])]
                print(f"{'  was':<36} {solver:<6} {was_med:6.2f} ms {was_p90:6.2f} ms {max(times[1]):6.1f} ms"
                      f"   {statistics.median(speedups):.1f}x now, call for call at the median,"
                      f" {sum(times[1]) / sum(times[0]):.1f}x in all")


if __name__ == "__main__":
    main()
