"""The engine's own ceiling: how many requests per second one engine process admits, routes and answers
when the workers cost nothing (zero-latency fake executors, :mod:`backends.fake`).

Everything of the serving path runs except diffusion: admission, routing, batching, the drop rule, the
discriminator's deferral (fake confidences: half the queries go on to the heavy stage), the worker call
(a thread hop in process, or a Ray actor call), PNG encoding of an 8x8 image, settling each query's
future. Closed loop: ``--clients`` coroutines each send one request of one image, wait for it, send the
next, for ``--seconds``. Printed per configuration: answered requests per second, and its ratio to the
first configuration measured in the same run (machines here are shared and noisy: read the ratios).

HTTP is not included (FastAPI and the client would share these two cores); see the README for what an
HTTP request adds.

    .venv/bin/python benchmarks/bench_engine.py                 # threads: 2, 8, 32 workers
    .venv/bin/python benchmarks/bench_engine.py --ray           # also Ray actors on a private local cluster
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backends.fake import FixedLatencyExecutor  # noqa: E402
from diffsim.config import ControllerConfig  # noqa: E402
from diffsim.server.engine import Engine, EngineConfig, Rejected  # noqa: E402
from diffsim.server.worker import ThreadWorker  # noqa: E402
from test_engine import fake_cascade  # noqa: E402


def make_engine(workers: int, kind: str) -> Engine:
    light = max(1, workers // 2)
    plan = {"threshold": 0.5, "light_workers": light, "heavy_workers": workers - light, "light_batch": 4,
            "heavy_batch": 4, "gpus": workers}
    config = EngineConfig(cascade=fake_cascade(slo_s=30.0), gpus=workers, policy="static", static_plan=plan,
                          controller=ControllerConfig(tick_s=1.0, replan_s=5.0), batch_sizes=(1, 2, 4))
    models = {"light": "sd-turbo", "heavy": "sd-v1.5"}
    if kind == "threads":
        handles = [ThreadWorker(w, lambda role: FixedLatencyExecutor(models[role], 0.0)) for w in range(workers)]
    else:
        from diffsim.server.ray_worker import RayWorker

        from backends.fake import FixedLatencyFactory

        factory = FixedLatencyFactory()
        handles = [RayWorker(w, (lambda role, w=w: factory(w, role, models[role])), backend="cpu-tiny")
                   for w in range(workers)]
    return Engine(config, handles)


async def closed_loop(engine: Engine, clients: int, seconds: float) -> tuple[int, int, float]:
    await engine.start()
    for _ in range(20):  # warm-up: first calls build executors and (Ray) actors
        await engine.generate(["warm-up"], [1])
    done = rejected = 0
    stop_at = time.perf_counter() + seconds

    async def client(c: int) -> None:
        nonlocal done, rejected
        i = 0
        while time.perf_counter() < stop_at:
            i += 1
            try:
                await engine.generate([f"c{c}-{i}"], [c * 1000 + i])
                done += 1
            except Rejected:
                rejected += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    await engine.stop()
    return done, rejected, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="2,8,32", help="worker counts (default 2,8,32)")
    ap.add_argument("--clients", type=int, default=256, help="concurrent closed-loop clients (default 256)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per configuration (default 5)")
    ap.add_argument("--ray", action="store_true", help="also workers as Ray actors (private local cluster)")
    args = ap.parse_args()
    kinds = ["threads"] + (["ray"] if args.ray else [])
    if args.ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from diffsim.server.ray_worker import connect, disconnect

        counts = [int(x) for x in args.workers.split(",")]
        connect("local", backend="cpu-tiny", workers=max(counts))
    print(f"engine ceiling: zero-latency workers, {args.clients} closed-loop clients, {args.seconds:g} s each, "
          f"one image per request, half deferred to heavy")
    print(f"{'workers':>8} {'kind':>8} {'answered/s':>11} {'rejected':>9} {'ratio':>7}")
    reference = None
    for kind in kinds:
        for workers in (int(x) for x in args.workers.split(",")):
            done, rejected, elapsed = asyncio.run(closed_loop(make_engine(workers, kind), args.clients, args.seconds))
            rate = done / elapsed
            reference = reference or rate
            print(f"{workers:>8} {kind:>8} {rate:>11.0f} {rejected:>9} {rate / reference:>7.2f}")
    if args.ray:
        disconnect()


if __name__ == "__main__":
    main()
