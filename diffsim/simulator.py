"""The SimPy driver: replays a trace through the cascade with batch times from the latency profile.

Processes (all rules live in the pure layer; this module only advances simulated time):

* **one arrival process** walks the trace and admits each query to the :class:`~diffsim.runtime.dispatcher.Dispatcher`
  (queries arriving at the same instant are admitted together);
* **one process per GPU worker**: when free it asks the dispatcher for a batch (FIFO, eager, drop rule),
  holds for the batch's time -- the profile's p50, or with ``service_time="sampled"`` a draw around it
  (:mod:`diffsim.runtime.service_time`), which the dispatcher then learns from as the server does from
  measured times -- and hands the batch back (completions and deferrals);
  with nothing to do it sleeps until a query is routed to it (or a swap / batching timeout ends);
* **the controller process** ticks every ``tick_s``: expires backlog, feeds the
  :class:`~diffsim.runtime.controller.Controller` the tick's measurements and applies the plans it returns.

The run ends when every query has its outcome. Same config + trace (+ seed) -> identical results: the
router's randomness comes from ``numpy.random.default_rng(seed)``, confidences and split decisions from
stable hashes, and SimPy orders same-time events by scheduling order.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import simpy
from simpy.core import EmptySchedule, StopSimulation

from .config import SimConfig
from .runtime.confidence import Confidences
from .runtime.controller import Controller
from .runtime.dispatcher import Batch, Dispatcher
from .plan import Plan
from .query import Query
from .runtime.admission import predict
from .runtime.routing import Router, first_stage
from .runtime.service_time import ServiceTimeModel


@dataclass
class SimResult:
    queries: list[Query]  # every arrival, in trace order, each with exactly one outcome
    plans: list[tuple[float, Plan]]  # (time applied, plan), in order; the first at t=0
    demand: list[tuple[float, float, float]]  # (tick time, measured arrival rate, demand planned for)
    worker_busy_s: list[float]  # busy time per worker
    duration_s: float  # simulated time until the last query ended
    events: int  # SimPy events processed
    wall_s: float
    config: SimConfig
    policy_s: float = field(default=0.0)  # wall time spent inside the policy (allocator)
    policy_calls: int = field(default=0)
    faults: list[tuple[float, tuple[int, ...], bool]] = field(default_factory=list)  # (time, workers, recover)


class _TimedPolicy:
    """Wraps a policy to add up the wall time of its ``plan`` calls (allocator time, reported apart)."""

    def __init__(self, policy):
        self.policy = policy
        self.name = getattr(policy, "name", type(policy).__name__)
        self.seconds = 0.0
        self.calls = 0

    def plan(self, inp) -> Plan:
        started = time.perf_counter()
        try:
            return self.policy.plan(inp)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


def make_confidences(config: SimConfig, prompt_ids: np.ndarray) -> Confidences:
    """Per-prompt confidences: the config's CSV, else the cascade's CSV, else sampled from f(t)."""
    path = config.confidences_path or config.cascade.confidences_path
    if path is None:
        return Confidences.from_curve(config.cascade.deferral, config.seed)
    conf = Confidences.from_csv(path)
    conf.check_covers(prompt_ids.tolist())
    return conf


def simulate(
    config: SimConfig,
    trace,
    *,
    progress: bool = False,
    policy=None,
    on_batch: Optional[Callable[[Batch], None]] = None,
    on_enqueue: Optional[Callable[[int, Query, float], None]] = None,
    confidences: Optional[Confidences] = None,
) -> SimResult:
    """Simulate ``trace`` under ``config``.

    ``policy`` overrides ``make_policy(config.policy, ...)`` (anything with ``plan(PolicyInput)``);
    ``confidences`` overrides the per-prompt confidences of :func:`make_confidences`;
    ``on_batch(batch)`` and ``on_enqueue(worker, query, now)`` are debug hooks called as batches start
    and as queries enter worker queues.
    """
    started = time.perf_counter()
    cascade = config.cascade
    if policy is None:
        from .policies import policy_for

        policy = policy_for(config)
    timed = _TimedPolicy(policy)
    dispatcher = Dispatcher(
        cascade,
        config.gpus,
        router=Router(config.routing, np.random.default_rng(config.seed)),
        confidences=confidences if confidences is not None else make_confidences(config, trace.prompt_id),
        seed=config.seed,
        drop_factor=config.drop_factor,
        batch_timeout_s=config.batch_timeout_s,
        swap_s=config.swap_s,
        answer_overhead_s=cascade.overheads.request_ms / 1e3,
    )
    dispatcher.on_enqueue = on_enqueue
    controller = Controller(timed, config.gpus, config.controller)
    plan0 = controller.initial_plan(0.0)
    dispatcher.apply_plan(plan0, 0.0, preloaded=True)
    plans: list[tuple[float, Plan]] = [(0.0, plan0)]
    demand: list[tuple[float, float, float]] = []
    queries: list[Query] = []
    total = len(trace)

    env = simpy.Environment()
    done = env.event()
    waiting: list[Optional[simpy.Event]] = [None] * config.gpus  # the wake-up event of a sleeping worker
    running: list[Optional[Batch]] = [None] * config.gpus  # the batch each worker is running
    processes: list[simpy.Process] = []

    def wake(w: int) -> None:
        ev = waiting[w]
        if ev is not None:
            waiting[w] = None
            ev.succeed()

    def check_done() -> None:
        if dispatcher.finished == total and not done.triggered:
            done.succeed()

    admitted = [0]  # how many queries the arrival process has admitted

    def arrivals():
        times = trace.arrival_s.tolist()
        prompt_ids = trace.prompt_id.tolist()
        seeds = trace.seed.tolist() if getattr(trace, "seed", None) is not None else None
        slo = cascade.slo_s
        admit = dispatcher.admit
        admission = config.admission
        i = 0
        while i < total:
            t = times[i]
            if t > env.now:
                yield env.timeout(t - env.now)
            now = env.now
            while i < total and times[i] == t:
                q = Query(i, prompt_ids[i], t, slo, seed=seeds[i] if seeds is not None else 0)
                queries.append(q)
                if admission and not predict(dispatcher, [first_stage(dispatcher.plan, i, config.seed)], now, slo,
                                             config.drop_factor).accept:
                    dispatcher.reject(q, now)
                    i += 1
                    continue
                w = admit(q, now)
                if w is not None and waiting[w] is not None:
                    wake(w)
                i += 1
            admitted[0] = i

    sampled = config.service_time == "sampled"
    times = ServiceTimeModel(cascade, config.service_time, config.seed)
    cold = [cascade.overheads.cold_start_s] * config.gpus  # each worker's first batch takes this much longer

    def worker(w: int):
        take = dispatcher.take_batch
        complete = dispatcher.complete_batch
        while True:
            batch, retry_at = take(w, env.now)
            if batch is None:
                check_done()  # the take may have dropped the last queries
                ev = env.event()
                waiting[w] = ev
                if retry_at is not None:
                    yield ev | env.timeout(retry_at - env.now)
                else:
                    yield ev
                waiting[w] = None
                continue
            if on_batch is not None:
                on_batch(batch)
            running[w] = batch
            run_s = times.draw(batch.role, len(batch.queries), batch.with_discriminator) if sampled else None
            if cold[w]:
                run_s = (batch.service_s if run_s is None else run_s) + cold[w]
                cold[w] = 0.0
            try:
                yield env.timeout(batch.service_s if run_s is None else run_s)
            except simpy.Interrupt:  # lost with this batch: the fault process has handed it back
                continue
            running[w] = None
            for target in complete(batch, env.now, run_s=run_s):
                if waiting[target] is not None:
                    wake(target)
            check_done()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(float(trace.duration_s) if total else 0.0, 1), unit="s", desc="simulated",
                   file=sys.stderr, leave=False, delay=2.0)  # shown only on runs longer than ~2 s

    def control():
        tick = config.controller.tick_s
        k = 0
        while True:
            k += 1
            yield env.timeout(k * tick - env.now)
            now = env.now
            dispatcher.expire_backlog(now)
            arrivals_in_tick, queue_lengths, stage_arrivals = dispatcher.tick_stats()
            plan = controller.on_tick(now, arrivals_in_tick, queue_lengths,
                                      (stage_arrivals[0] / tick, stage_arrivals[1] / tick),
                                      dispatcher.workers_in_service())
            demand.append((now, controller.rate_qps, controller.demand_qps))
            if plan is not None:
                dispatcher.apply_plan(plan, now)
                plans.append((now, plan))
                for w in range(config.gpus):
                    if waiting[w] is not None:
                        wake(w)
            if admitted[0] == total and dispatcher.finished < total and not dispatcher.holding():
                raise RuntimeError(f"{total - dispatcher.finished} queries neither ended nor are held (a bug)")
            if bar is not None and bar.n < bar.total:
                bar.update(round(min(now, bar.total) - bar.n, 6))
            check_done()

    def faults():
        for fault in config.faults:
            if fault.at_s > env.now:
                yield env.timeout(fault.at_s - env.now)
            now = env.now
            for w in fault.workers:
                if fault.recover:
                    if not dispatcher.in_service[w]:
                        dispatcher.restore_worker(w)
                    continue
                if not dispatcher.in_service[w]:
                    continue
                batch = running[w]
                if batch is not None:
                    running[w] = None
                    processes[w].interrupt("lost")
                for target in dispatcher.remove_worker(w, now, batch):
                    if waiting[target] is not None:
                        wake(target)
            fault_log.append((now, tuple(fault.workers), fault.recover))

    def deadlines():
        period = config.deadline_sweep_s
        while True:
            yield env.timeout(period)
            if dispatcher.expire_queued(env.now):
                check_done()

    fault_log: list[tuple[float, tuple[int, ...], bool]] = []
    events = 0
    if total:
        env.process(arrivals())
        for w in range(config.gpus):
            processes.append(env.process(worker(w)))
        env.process(control())
        if config.faults:
            env.process(faults())
        if config.deadline_sweep_s > 0:
            env.process(deadlines())
        events = _run_until(env, done)
    if bar is not None:
        bar.close()
    return SimResult(
        queries=queries,
        plans=plans,
        demand=demand,
        worker_busy_s=list(dispatcher.busy_s),
        duration_s=env.now,
        events=events,
        wall_s=time.perf_counter() - started,
        config=config,
        policy_s=timed.seconds,
        policy_calls=timed.calls,
        faults=fault_log,
    )


def _run_until(env: simpy.Environment, until: simpy.Event) -> int:
    """``env.run(until=...)`` that also counts the events processed (cheaper than overriding step)."""
    until.callbacks.append(StopSimulation.callback)
    step = env.step
    n = 0
    try:
        while True:
            n += 1
            step()
    except StopSimulation:
        return n
    except EmptySchedule:
        raise RuntimeError("the simulation ran out of events before every query ended") from None
