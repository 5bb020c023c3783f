"""The wall-clock driver: the simulator's rules, run by asyncio against real workers.

Everything that decides lives in the pure layer and is shared with ``diffsim simulate``:
:class:`~diffsim.runtime.dispatcher.Dispatcher` (routing, FIFO queues, eager batching, the drop rule, deferral,
role switches), :class:`~diffsim.runtime.controller.Controller` (demand EWMA, Little's-law queueing delays,
re-plan period) and the policy/allocator. This module only tells them what happened and when, exactly
as :mod:`diffsim.simulator` does, with three differences that come from running for real:

* a batch's time is measured, not looked up: the worker runs it (:mod:`diffsim.server.worker`) and the
  measured time is what the dispatcher books in the query records and the workers' busy time;
* the confidence that decides deferral is the discriminator's score of the actual light image, handed
  to :meth:`~diffsim.runtime.dispatcher.Dispatcher.complete_batch` with the batch;
* new queries pass the admission rule (:mod:`diffsim.runtime.admission`) first, and an executor that raises
  fails only its own batch's queries (:meth:`~diffsim.runtime.dispatcher.Dispatcher.fail_batch`).

Tasks on the event loop: one per worker (take a batch, run it, hand it back; sleep until woken), and the
controller (every ``tick_s``: expire backlog, feed the controller, apply the plan it returns). Every
admitted query resolves its future exactly once, with its final outcome.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..runtime.admission import Decision, predict
from ..config import RunConfig
from ..runtime.controller import Controller
from ..runtime.dispatcher import STAGES, Batch, Dispatcher
from ..errors import DiffsimError
from ..plan import Plan
from ..query import Query
from ..runtime.health import WorkerHealth, stall_limit_s
from ..runtime.routing import Router, first_stage
from .worker import BatchJob, WorkerHandle, WorkerLost

log = logging.getLogger("diffsim.server")

HISTORY = 10_000  # plans and demand samples kept for /v1/plan and the metrics


@dataclass(frozen=True)
class EngineConfig(RunConfig):
    """How the engine runs: the settings it shares with the simulator (:class:`~diffsim.config.RunConfig`),
    with the server's defaults for its promises, plus what only a real server has."""

    swap: bool = False  # one model resident per worker; a role change loads the other one (swap_s: its time)
    admission: bool = True  # apply the admission rule (429 instead of queueing a hopeless query)
    deadline_sweep_s: float = 0.1  # how often queued requests are checked against their deadline


class Rejected(Exception):
    """Refused by the admission rule (HTTP 429)."""

    def __init__(self, decision: Decision):
        super().__init__(
            f"the server cannot finish this request within its deadline (predicted "
            f"{decision.predicted_completion_s - decision.deadline_s:+.1f} s past it); retry later"
        )
        self.decision = decision


class Unavailable(Exception):
    """The engine is draining or stopped (HTTP 503)."""


@dataclass(frozen=True)
class QueryAnswer:
    """A query's final state, handed to whoever submitted it."""

    query: Query
    png: Optional[bytes]  # the served image (completed only)
    model: Optional[str]  # the model that made it


class Engine:
    """Queues, workers and the control loop of one server. All methods run on one event loop."""

    def __init__(self, config: EngineConfig, workers: Sequence[WorkerHandle], *, policy=None,
                 clock: Callable[[], float] = time.monotonic):
        if len(workers) != config.gpus:
            raise DiffsimError(f"{len(workers)} workers for {config.gpus} GPUs")
        self.config = config
        self.cascade = config.cascade
        self.workers = list(workers)
        if policy is None:
            from ..policies import policy_for

            policy = policy_for(config)
        self.policy = policy
        self.dispatcher = Dispatcher(
            config.cascade,
            config.gpus,
            router=Router(config.routing, np.random.default_rng(config.seed)),
            # no confidence source: every light batch comes back with the discriminator's scores
            seed=config.seed,
            drop_factor=config.drop_factor,
            batch_timeout_s=config.batch_timeout_s,
            swap_s=config.swap_s if config.swap else 0.0,
            # fallback "light": a deferred query whose heavy image would be late ends completed, served light;
            # the light image its light batch left in _images is the one answered (_finish)
            fallback=config.fallback,
        )
        self.controller = Controller(policy, config.gpus, config.controller)
        self.health = WorkerHealth(config.gpus, config.health)
        self._clock = clock
        self._t0: Optional[float] = None
        self.plans: collections.deque[tuple[float, Plan]] = collections.deque(maxlen=HISTORY)
        self.plan_id = 0
        self.demand: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=HISTORY)
        self._next_id = 0
        self._pending: dict[int, tuple[Query, asyncio.Future]] = {}
        self._images: dict[int, tuple[bytes, str]] = {}  # query id -> (latest image, its model)
        self._settled = 0
        self._wake: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._idle = asyncio.Event()  # set whenever nothing is pending
        self._idle.set()
        self.draining = False
        self.started = False
        self.stopped = False
        self._controller_state: Optional[tuple[float, dict]] = None  # (tick time, Controller.state then)
        # Counters (the HTTP layer and Prometheus read them).
        self.outcomes = {"completed": 0, "dropped": 0, "failed": 0, "rejected": 0}
        self.late = 0
        self.violations = 0
        self.fallback_light = 0  # deferred queries answered with their light image (fallback "light")
        self.batches = {"light": 0, "heavy": 0}
        self.failed_batches = 0
        self.lost_batches = 0  # batches handed back by a lost worker (served again elsewhere)
        # Observers: on_query(query) when a query ends; on_image(query, png) when it ends with an image;
        # on_batch(role, size, run_s, failed) after a batch. They run on the event loop: keep them cheap.
        self.on_query: list[Callable[[Query], None]] = []
        self.on_image: list[Callable[[Query, bytes], None]] = []
        self.on_batch: list[Callable[[str, int, float, bool], None]] = []
        self.quality = None  # the served-image quality monitor, when attached (attach_quality)

    # -- clock ------------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Seconds since the engine started (the simulator's t)."""
        return 0.0 if self._t0 is None else self._clock() - self._t0

    # -- life cycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the initial plan's models, then start the worker loops and the controller."""
        if self.started:
            return
        plan0 = self.controller.initial_plan(0.0)
        self._controller_state = (0.0, self.controller.state(0.0))
        self.dispatcher.apply_plan(plan0, 0.0, preloaded=True)
        await asyncio.gather(*(w.start(role) for w, role in zip(self.workers, self.dispatcher.roles)))
        self._t0 = self._clock()
        self.plans.append((0.0, plan0))
        self.plan_id = 1
        self._wake = [asyncio.Event() for _ in self.workers]
        self._tasks = [asyncio.create_task(self._worker_loop(w), name=f"diffsim-worker-{w}")
                       for w in range(len(self.workers))]
        self._tasks.append(asyncio.create_task(self._control_loop(), name="diffsim-controller"))
        self._tasks.append(asyncio.create_task(self._deadline_loop(), name="diffsim-deadlines"))
        self.started = True
        log.info("engine started: %d workers, plan %s", len(self.workers), _plan_text(plan0))

    async def drain(self, timeout_s: Optional[float] = None) -> bool:
        """Stop admitting and wait until every admitted query has its outcome; False on timeout."""
        self.draining = True
        if timeout_s is None:
            timeout_s = self.default_drain_s()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def default_drain_s(self) -> float:
        """Long enough for every queued query to finish or be dropped: the drop limit plus the slowest
        batch the profile knows."""
        c = self.cascade
        slowest = max(v for v in c.heavy.p50_ms + c.light.p50_ms if v is not None) / 1e3
        return self.config.drop_factor * c.slo_s + 2 * slowest + 1.0

    async def stop(self, drain_timeout_s: Optional[float] = None) -> None:
        """Drain, stop the loops, answer anything still pending (failed: shut down), stop the workers."""
        if self.stopped:
            return
        if self.started:
            await self.drain(drain_timeout_s)
        self.stopped = True
        for task in self._tasks + list(self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        now = self.now
        for qid, (q, fut) in list(self._pending.items()):
            if q.outcome is None:
                q.finish("failed", now, error="the server shut down before this query finished")
                self._finish(qid, q, fut)
        self._pending.clear()
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        if self.quality is not None:  # closes its last (partial) window
            await asyncio.to_thread(self.quality.stop)

    def attach_quality(self, monitor) -> None:
        """Feed every served image to ``monitor`` (a :class:`~diffsim.server.quality_monitor.QualityMonitor`,
        started by the caller; stopped with the engine)."""
        self.quality = monitor
        self.on_image.append(lambda q, png: monitor.offer(png, q.served_by or "light", q.finished_s))

    # -- queries ----------------------------------------------------------------------------------------

    async def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[QueryAnswer]:
        """Admit one query per prompt (all or none) and wait for their outcomes.

        Raises :class:`Rejected` when the admission rule refuses them and :class:`Unavailable` when the
        engine is not serving.
        """
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError("give one seed per prompt, and at least one prompt")
        if not self.started or self.draining or self.stopped:
            raise Unavailable("the server is shutting down" if self.draining or self.stopped else "not started")
        now = self.now
        ids = list(range(self._next_id, self._next_id + len(prompts)))
        self._next_id += len(prompts)
        decision = self.admission(ids, now)
        slo = self.cascade.slo_s
        if not decision.accept:
            self.dispatcher.refuse(len(ids))  # refused demand is still demand: the controller plans for it
            for qid, prompt, seed in zip(ids, prompts, seeds):
                q = Query(qid, qid, now, slo, prompt=prompt, seed=int(seed))
                q.finish("rejected", now)
                self._count(q)
            raise Rejected(decision)
        loop = asyncio.get_running_loop()
        futures = []
        for qid, prompt, seed in zip(ids, prompts, seeds):
            q = Query(qid, qid, now, slo, prompt=prompt, seed=int(seed))
            fut = loop.create_future()
            self._pending[qid] = (q, fut)
            futures.append(fut)
            self._wake_worker(self.dispatcher.admit(q, now))
        self._idle.clear()
        return list(await asyncio.gather(*futures))

    def admission(self, ids: Sequence[int], now: float) -> Decision:
        """The admission rule (:func:`diffsim.runtime.admission.predict`) for new queries with these ids,
        arriving now: accepted iff each can finish its whole path within drop_factor x SLO."""
        if not self.config.admission:
            return Decision(True, now, now + self.config.drop_factor * self.cascade.slo_s, 0.0)
        plan = self.dispatcher.plan
        stages = [first_stage(plan, qid, self.config.seed) for qid in ids]
        return predict(self.dispatcher, stages, now, self.cascade.slo_s, self.config.drop_factor)

    def describe(self) -> dict:
        """Everything a simulation of this server needs (``GET /v1/config``; ``diffsim validate``): the
        cascade's curves, the latency profile the allocator plans with, and every run setting."""
        import dataclasses
        import datetime as _dt

        c = self.cascade
        cfg = self.config
        dump = lambda m: m.model_dump(exclude_none=True)  # noqa: E731
        return {
            "cascade": {
                "name": c.name, "light": c.light_model, "heavy": c.heavy_model, "slo_s": c.slo_s,
                "deferral_curve": dump(c.deferral), "fid": dump(c.fid),
                **({"fid_random_mix": dump(c.fid_random)} if c.fid_random is not None else {}),
            },
            "profile": {
                "gpu": c.gpu,
                "provenance": {"source": "diffsim serve: GET /v1/config", "gpu": c.gpu,
                               "date": _dt.date.today().isoformat()},
                "models": {c.light_model: dump(c.light), c.heavy_model: dump(c.heavy)},
                "discriminator": dump(c.discriminator),
                "overheads": dump(c.overheads),
            },
            "run": {
                "gpus": cfg.gpus, "policy": cfg.policy, "seed": cfg.seed, "routing": cfg.routing,
                "drop_factor": cfg.drop_factor, "batch_timeout_s": cfg.batch_timeout_s, "swap_s": cfg.swap_s,
                "batch_sizes": list(cfg.batch_sizes), "static_plan": cfg.static_plan,
                "max_utilization": cfg.max_utilization, "batch_wait": cfg.batch_wait,
                "admission": cfg.admission, "deadline_sweep_s": cfg.deadline_sweep_s,
                "queue_model": cfg.queue_model, "tail_quantile": cfg.tail_quantile, "fallback": cfg.fallback,
                "controller": dataclasses.asdict(cfg.controller), "health": dataclasses.asdict(cfg.health),
            },
            "policy_name": getattr(self.policy, "name", cfg.policy),
        }

    # -- settling outcomes ------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Resolve the futures of queries the dispatcher has just finished (completed or dropped)."""
        if self.dispatcher.finished == self._settled:
            return
        self._settled = self.dispatcher.finished
        for qid, (q, fut) in list(self._pending.items()):
            if q.outcome is not None:
                del self._pending[qid]
                self._finish(qid, q, fut)
        if not self._pending:
            self._idle.set()

    def _finish(self, qid: int, q: Query, fut: asyncio.Future) -> None:
        image = self._images.pop(qid, None)
        png, model = (image if q.outcome == "completed" and image is not None else (None, None))
        self._count(q)
        if png is not None:
            for hook in self.on_image:
                hook(q, png)
        if not fut.done():  # its waiter may have been cancelled (client gone); the outcome still counts
            fut.set_result(QueryAnswer(q, png, model))

    def _count(self, q: Query) -> None:
        self.outcomes[q.outcome] += 1
        self.late += q.late
        self.violations += q.violation
        self.fallback_light += q.fell_back
        for hook in self.on_query:
            hook(q)

    # -- workers ----------------------------------------------------------------------------------------

    def _wake_worker(self, w: Optional[int]) -> None:
        if w is not None and self._wake:
            self._wake[w].set()

    async def _worker_loop(self, w: int) -> None:
        d = self.dispatcher
        event = self._wake[w]
        while True:
            event.clear()
            batch, retry_at = d.take_batch(w, self.now)
            self._settle()  # the take may have dropped queries
            if batch is None:
                timeout = None if retry_at is None else max(0.0, retry_at - self.now)
                try:
                    await asyncio.wait_for(event.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run_batch(w, batch)
            self._settle()

    async def _run_batch(self, w: int, batch: Batch) -> None:
        d = self.dispatcher
        job = BatchJob(batch.role, tuple(q.prompt for q in batch.queries), tuple(q.seed for q in batch.queries),
                       batch.with_discriminator)
        started = self._clock()
        limit = stall_limit_s(self.config.health, batch.service_s)
        try:
            result = await asyncio.wait_for(self.workers[w].run(job), limit)
            if len(result.images_png) != len(batch.queries):
                raise RuntimeError(f"{len(result.images_png)} images for a batch of {len(batch.queries)}")
            if batch.with_discriminator and (result.confidences is None
                                             or len(result.confidences) != len(batch.queries)):
                raise RuntimeError("the light batch came back without a confidence per image")
        except asyncio.CancelledError:
            raise
        except WorkerLost as e:
            self._lose(w, batch, str(e))
            return
        except asyncio.TimeoutError:
            self._lose(w, batch, f"no answer to a {batch.role} batch within {limit:.0f} s")
            return
        except Exception as e:  # noqa: BLE001 - any executor failure fails this batch only
            self._fail_batch(batch, self._clock() - started, e)
            return
        self.health.batch_succeeded(w)
        now = self.now
        model = self.cascade.light_model if batch.role == "light" else self.cascade.heavy_model
        # The batch held its worker from the take to now on the engine's clock: the executor's own time
        # plus the hand-offs between the event loop and the worker (which grow when the loop is busy, as
        # under a burst of requests). Batch times are learnt from that, so admission and the drop rule
        # predict what the loop will really see.
        measured = max(result.run_s, self._clock() - started)
        for i, q in enumerate(batch.queries):
            self._images[q.id] = (result.images_png[i], model)
        size = len(batch.queries)
        scores = result.confidences if batch.with_discriminator else None
        for target in d.complete_batch(batch, now, scores, run_s=measured):
            self._wake_worker(target)
        self.batches[batch.role] += 1
        for hook in self.on_batch:
            hook(batch.role, size, measured, False)

    def _fail_batch(self, batch: Batch, run_s: float, error: BaseException) -> None:
        """The executor raised: this batch's queries fail (with the error); the worker goes on serving."""
        now = self.now
        message = f"worker {batch.worker} failed running a {batch.role} batch: {type(error).__name__}: {error}"
        log.error("%s", message)
        self.dispatcher.fail_batch(batch, now, message, run_s=run_s)
        self.failed_batches += 1
        for hook in self.on_batch:
            hook(batch.role, len(batch.queries), run_s, True)
        if self.health.batch_failed(batch.worker, now, f"{type(error).__name__}: {error}"):
            self._take_out(batch.worker, None)

    # -- worker loss and return -------------------------------------------------------------------------

    def _lose(self, w: int, batch: Optional[Batch], reason: str) -> None:
        """Worker ``w`` is gone: its batch is served again elsewhere, it is out until a probe succeeds."""
        log.error("worker %d lost: %s", w, reason)
        if batch is not None:
            self.lost_batches += 1
        if self.health.lost(w, self.now, reason):
            self._take_out(w, batch)

    def _take_out(self, w: int, batch: Optional[Batch]) -> None:
        d = self.dispatcher
        log.error("worker %d out of service (%s); %d of %d in service", w, self.health.reason[w],
                  self.health.count_in_service(), len(self.workers))
        for target in d.remove_worker(w, self.now, batch):
            self._wake_worker(target)
        self._settle()
        self._spawn(self._bring_back(w), f"bring worker {w} back")

    async def _bring_back(self, w: int) -> None:
        """Probe an out-of-service worker every ``probe_s`` until it serves again, then restore it (the
        controller gives it a role at its next tick)."""
        cfg = self.config.health
        while not self.stopped:
            await asyncio.sleep(cfg.probe_s)
            try:
                await asyncio.wait_for(self.workers[w].probe(), cfg.stall_min_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure: still out; try again later
                self.health.probe_failed(w, self.now, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                continue
            if self.health.back(w, self.now):
                self.dispatcher.restore_worker(w)
                log.warning("worker %d back in service; %d of %d in service", w,
                            self.health.count_in_service(), len(self.workers))
            return

    # -- deadlines --------------------------------------------------------------------------------------

    async def _deadline_loop(self) -> None:
        """Answer queued requests that can no longer finish in time (504) within ``deadline_sweep_s`` of
        that moment, instead of when they reach a worker."""
        period = self.config.deadline_sweep_s
        if period <= 0:
            return
        while True:
            await asyncio.sleep(period)
            if self.dispatcher.expire_queued(self.now):
                self._settle()

    # -- the controller ---------------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        tick = self.config.controller.tick_s
        d = self.dispatcher
        k = 0
        while True:
            k += 1
            await asyncio.sleep(max(0.0, k * tick - self.now))
            now = self.now
            d.expire_backlog(now)
            self._settle()
            arrivals, queue_lengths, stage = d.tick_stats()
            try:
                plan = await asyncio.to_thread(self.controller.on_tick, now, arrivals, queue_lengths,
                                               (stage[0] / tick, stage[1] / tick), d.workers_in_service(),
                                               in_system=d.holding())
            except Exception as e:  # noqa: BLE001 - a policy failure keeps the plan in force
                log.error("re-planning failed, keeping the current plan: %s: %s", type(e).__name__, e)
                plan = None
            self.demand.append((now, self.controller.rate_qps, self.controller.demand_qps))
            # A worker may have left while the policy ran: the next tick re-plans for the ones left.
            if plan is not None and plan.gpus_used <= d.workers_in_service():
                self.apply_plan(plan)
            # What GET /v1/plan reports of the controller: its state as this tick left it (the tick runs
            # in a thread, and a state read during the policy's solve would be half old, half new).
            self._controller_state = (now, self.controller.state(now))

    def apply_plan(self, plan: Plan) -> None:
        """Switch to ``plan`` now (the controller's plans come here; tests may call it directly)."""
        now = self.now
        d = self.dispatcher
        old = list(d.roles)
        d.apply_plan(plan, now)
        self.plans.append((now, plan))
        self.plan_id += 1
        if self.config.swap:
            for w, (before, after) in enumerate(zip(old, d.roles)):
                if after is not None and before != after:
                    self._spawn(self.workers[w].prepare(after), f"swap worker {w} to {after}")
        for w in range(len(self.workers)):
            self._wake_worker(w)
        self._settle()

    def _spawn(self, coro, what: str) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed: %s", what, t.exception())

        task.add_done_callback(done)

    # -- state for the HTTP layer -----------------------------------------------------------------------

    @property
    def plan(self) -> Optional[Plan]:
        return self.dispatcher.plan

    @property
    def pending(self) -> int:
        return len(self._pending)

    def snapshot(self) -> dict:
        """The plan in force and the live state, as plain JSON-able data (``GET /v1/plan``)."""
        d = self.dispatcher
        applied_s = self.plans[-1][0] if self.plans else 0.0
        light_q, heavy_q = d.queue_lengths()
        now = self.now
        return {
            "plan_id": self.plan_id,
            "applied_s": applied_s,
            "now_s": now,
            "plan": d.plan.to_dict() if d.plan is not None else None,
            "cascade": self.cascade.name,
            "gpu": self.cascade.gpu,
            "slo_s": self.cascade.slo_s,
            "drop_factor": self.config.drop_factor,
            "policy": getattr(self.policy, "name", self.config.policy),
            "routing": self.config.routing,
            "gpus": self.config.gpus,
            "swap": self.config.swap,
            "fallback": self.config.fallback,
            "controller": {
                "ticks": self.controller.ticks,
                "rate_qps": self.controller.rate_qps,
                "demand_qps": self.controller.demand_qps,
                "queue_delay_s": list(self.controller.queue_delay_s),
                # where a simulation of the next run starts: the state the last tick left, and that tick's time
                "state": self._controller_state[1] if self._controller_state else None,
                "state_at_s": self._controller_state[0] if self._controller_state else None,
            },
            "workers": {
                "roles": list(d.roles),
                "busy_s": list(d.busy_s),
                "inflight": list(d.inflight),
                "in_service": d.workers_in_service(),
                "health": self.health.snapshot(),
                "lost_batches": self.lost_batches,
            },
            "queues": {"light": light_q, "heavy": heavy_q},
            "service_time_ratio": d.service.mean_ratio(),  # measured / profile batch time, per stage
            "service_time_estimate": d.service.state(),  # what batches, drops and admission are judged by
            "pending": len(self._pending),
            "outcomes": dict(self.outcomes),
            "late": self.late,
            "violations": self.violations,
            "fallback_light": self.fallback_light,  # deferred queries answered with their light image
            "draining": self.draining,
        }


def _plan_text(plan: Plan) -> str:
    return (f"{plan.mode} t={plan.threshold:g} light {plan.light.workers}x b{plan.light.batch_size}, "
            f"heavy {plan.heavy.workers}x b{plan.heavy.batch_size}"
            + ("" if plan.feasible else f" (infeasible: {plan.reason})"))
