"""The cluster's query state, without a clock: queues, roles, batches, deferrals, drops.

Both drivers hold one :class:`Dispatcher` and only tell it what happened and when:

* a query arrived -> :meth:`Dispatcher.admit` (routes it; returns the worker to wake, if any);
* a worker is free -> :meth:`Dispatcher.take_batch` (forms its next batch, applying the drop rule;
  or says when to look again);
* a batch finished -> :meth:`Dispatcher.complete_batch` (completes queries, or scores and defers them
  to the heavy stage; returns the workers to wake); a real run hands it the discriminator's measured
  scores and the measured batch time, the simulator neither (profile time, per-prompt confidences);
* a batch raised -> :meth:`Dispatcher.fail_batch` (its queries end ``failed``; the worker goes on);
* a controller tick -> :meth:`Dispatcher.expire_backlog` and :meth:`Dispatcher.tick_stats`;
* a new plan -> :meth:`Dispatcher.apply_plan` (role changes with re-routing of queued work);
* a worker left service (lost, or failing: :mod:`diffsim.runtime.health`) ->
  :meth:`Dispatcher.remove_worker` (its running batch back to the front of its stage, its queue
  re-routed); it is back -> :meth:`Dispatcher.restore_worker` (a role comes with the next plan).

The rules themselves live in :mod:`diffsim.runtime.routing`, :mod:`diffsim.runtime.batching` and :mod:`diffsim.runtime.roles`;
this class composes them and keeps the per-query records (:class:`~diffsim.query.Query`) up to date.
Queries for a stage that has no worker wait in that stage's backlog (FIFO) until one exists, and are
dropped from it once they could no longer finish in time -- never lost.

With ``fallback="light"`` a deferred query is never left waiting for a heavy image it cannot have in time
(:func:`~diffsim.runtime.batching.late_deferred`): it is answered with its light image, ``completed``
and served by ``light`` (:attr:`Query.fell_back`), when it is deferred to a heavy
worker (or a stage with no worker) that could not finish it by its SLO deadline, when a heavy batch is
formed, and at the deadline sweep (:meth:`Dispatcher.expire_queued`). It is one rule in every placement
of a deferred query, so a query moved by a new plan or a lost worker is judged the same way. A heavy
batch whose executor raises answers its deferred queries light too (:meth:`Dispatcher.fail_batch`). Heavy batch
times are judged by the cautious estimate admission promises on
(:meth:`~diffsim.runtime.batching.ServiceTimes.cautious`): a heavy image that comes late is a violation,
one served light is not.

Every query ends in exactly one outcome (``Query.finish`` refuses a second one); :attr:`finished`
counts them so a driver knows when all its queries are done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .batching import (FALLBACKS, ServiceTimes, batch_ready, expired, form_batch, late_deferred,
                       misses_deadline)
from .confidence import Confidences
from ..plan import Plan, Role
from ..profiles import Cascade
from ..query import Query
from .roles import assign_roles, needs_swap, switched
from .routing import LoadIndex, Router, defers, first_stage
from .service_time import LogNormalDraws

STAGES: tuple[Role, Role] = ("light", "heavy")


@dataclass(slots=True)
class Batch:
    """One batch a worker runs: decided at its start under the plan in force then."""

    worker: int
    role: Role
    queries: list[Query]
    batch_size: int  # the plan's batch size for the stage (the batch may hold fewer)
    start_s: float
    service_s: float  # the profile's time for this batch (what the simulator waits; the server measures)
    with_discriminator: bool  # light batch in cascade mode: score and maybe defer
    threshold: float


class _Loads:
    """loads[w] = queued + in-flight queries of worker w, computed when read (what :meth:`Router.choose`
    is handed; least-loaded routing reads the dispatcher's :class:`LoadIndex` instead)."""

    __slots__ = ("queues", "inflight")

    def __init__(self, queues: list[deque], inflight: list[int]):
        self.queues = queues
        self.inflight = inflight

    def __getitem__(self, w: int) -> int:
        return len(self.queues[w]) + self.inflight[w]


class Dispatcher:
    def __init__(
        self,
        cascade: Cascade,
        gpus: int,
        *,
        router: Router,
        confidences: Optional[Confidences] = None,
        seed: int = 0,
        drop_factor: float = 1.5,
        batch_timeout_s: float = 0.0,
        swap_s: float = 0.0,
        answer_overhead_s: float | LogNormalDraws = 0.0,
        estimates_from: Optional[Cascade] = None,
        fallback: str = "none",
    ):
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r} (choose from {', '.join(FALLBACKS)})")
        self.cascade = cascade
        self.gpus = gpus
        self.router = router
        self.confidences = confidences
        self.seed = seed
        self.limit_s = drop_factor * cascade.slo_s
        self.batch_timeout_s = batch_timeout_s
        self.swap_s = swap_s
        # Added to a completed query's finish time: what the client waits beyond the batches (HTTP and
        # encoding). The simulator models it from the profile -- a constant, or a callable drawing one
        # query's overhead (:func:`~diffsim.runtime.service_time.request_overhead`); the server measures it
        # for real (0 here).
        # The light fallback promises on the constant, or on the drawn overheads' median (a sampled overhead
        # is drawn per answer, after the decision).
        if isinstance(answer_overhead_s, LogNormalDraws):
            self.answer_overhead_s, self._draw_overhead = 0.0, answer_overhead_s
            self._answer_promise_s = answer_overhead_s.median_s
        else:
            self.answer_overhead_s, self._draw_overhead = answer_overhead_s, None
            self._answer_promise_s = answer_overhead_s
        # The batch-time estimates batches, drops and admission are judged by: the cascade's profile (or
        # ``estimates_from``, another one: the server's, in validate), learnt from measured times.
        self.service = ServiceTimes(estimates_from or cascade, limit_s=self.limit_s)
        self.plan: Optional[Plan] = None
        # role -> (batch size, with discriminator, service time of a batch of n for n = 0..batch size)
        self._stage_settings: dict[str, tuple[int, bool, list[float]]] = {}
        self.roles: list[Optional[Role]] = [None] * gpus
        self.loaded: list[Optional[Role]] = [None] * gpus  # the model each worker holds
        self.queues: list[deque[Query]] = [deque() for _ in range(gpus)]
        self.inflight = [0] * gpus
        self.busy_s = [0.0] * gpus
        self.busy_until = [0.0] * gpus  # predicted end of the running batch (start + estimated time)
        self.ready_at = [0.0] * gpus  # serves nothing before (model swap)
        self.swap_pending = [False] * gpus  # swap starts when the running batch ends
        self.in_service = [True] * gpus  # only workers in service get a role
        self.stage_workers: dict[str, list[int]] = {"light": [], "heavy": []}
        self.backlog: dict[str, deque[Query]] = {"light": deque(), "heavy": deque()}
        self.finished = 0
        self.light_fallback = fallback == "light"  # late deferred queries get their light image
        self._loads = _Loads(self.queues, self.inflight)
        # Least-loaded routing's index of worker loads; kept current by _load_changed and _stages_changed.
        self._index: Optional[LoadIndex] = LoadIndex(gpus) if router.kind == "least-loaded" else None
        self._tick_arrivals = 0
        self._tick_stage = {"light": 0, "heavy": 0}
        # Debug hook: called as on_enqueue(worker, query, now) whenever a query enters a worker queue.
        self.on_enqueue: Optional[Callable[[int, Query, float], None]] = None

    # -- arrivals and routing -----------------------------------------------------------------

    def admit(self, query: Query, now: float) -> Optional[int]:
        """A new query: route it to its first stage. Returns the worker that got it (None: backlog)."""
        self._tick_arrivals += 1
        return self._enter_stage(query, first_stage(self.plan, query.id, self.seed), now)

    def refuse(self, count: int = 1) -> None:
        """Queries refused at the door (admission): not served, but demand the controller must see."""
        self._tick_arrivals += count

    def reject(self, query: Query, now: float) -> None:
        """``query`` is refused at the door: it ends ``rejected`` and counts as demand (:meth:`refuse`)."""
        self.refuse(1)
        query.finish("rejected", now)
        self.finished += 1

    def _enter_stage(self, query: Query, role: Role, now: float) -> Optional[int]:
        self._tick_stage[role] += 1
        query.enqueued_s = now
        return self._place(query, role, now)

    def _place(self, query: Query, role: Role, now: float, front: bool = False) -> Optional[int]:
        workers = self.stage_workers[role]
        judge = self.light_fallback and query.deferred and role == "heavy"
        if judge and not workers:  # no heavy worker now: its heavy image cannot be counted on in time
            self._fall_back(query, now)
            return None
        if not workers:
            if front:
                self.backlog[role].appendleft(query)
            else:
                self.backlog[role].append(query)
            return None
        w = self._index.least_loaded(role) if self._index is not None else self.router.choose(workers, self._loads)
        if judge:
            # its place: the back of the queue, or the front for a lost batch's queries put back
            b, queue = self._stage_settings[role][0], self.queues[w]
            position = 0 if front else len(queue)
            if misses_deadline(query, self._free_at(w, now), position, len(queue) + 1, b, self._promise_s,
                               self._answer_promise_s):
                self._fall_back(query, now)
                return None
        if front:
            self.queues[w].appendleft(query)
        else:
            self.queues[w].append(query)
        self._load_changed(w)
        if self.on_enqueue is not None:
            self.on_enqueue(w, query, now)
        return w

    # -- batches --------------------------------------------------------------------------------

    def take_batch(self, worker: int, now: float) -> tuple[Optional[Batch], Optional[float]]:
        """The worker's next batch, or ``(None, retry_at)``: look again at ``retry_at`` (swap or
        batching timeout) or, when it is None, once new work arrives. Drops are applied here."""
        role = self.roles[worker]
        queue = self.queues[worker]
        if role is None or not queue:
            return None, None
        if now < self.ready_at[worker]:
            return None, self.ready_at[worker]
        b, with_disc, times = self._stage_settings[role]
        if self.batch_timeout_s > 0:
            retry = batch_ready(len(queue), queue[0].enqueued_s, now, b, self.batch_timeout_s)
            if retry is not None:
                return None, retry
        late = self._fall_back_late(worker, now, now) if self.light_fallback and role == "heavy" else 0
        batch, dropped = form_batch(queue, now, b, times.__getitem__, self.limit_s)
        # Queued + in flight changes only by the drops and fallbacks (and any batch still marked in flight):
        # taking queued queries into a batch moves them from one to the other.
        load_changes = bool(dropped) or bool(late) or self.inflight[worker] > 0
        if dropped:
            for q in dropped:
                q.finish("dropped", now)
            self.finished += len(dropped)
        if not batch:
            if load_changes:
                self._load_changed(worker)
            return None, None
        n = len(batch)
        for q in batch:
            q.queue_s += now - q.enqueued_s
            q.stages.append(role)
            q.batch_sizes.append(n)
        self.inflight[worker] = n
        if load_changes:
            self._load_changed(worker)
        self.busy_until[worker] = now + times[n]
        return Batch(worker, role, batch, b, now, times[n], with_disc, self.plan.threshold), None

    def complete_batch(self, batch: Batch, now: float, confidences: Optional[Sequence[float]] = None, *,
                       run_s: Optional[float] = None) -> list[int]:
        """A batch ended: complete its queries, or defer low-confidence ones. Returns workers to wake.

        ``confidences``: the discriminator's scores of this light batch's images, one per query in batch
        order (a real run); None reads each prompt's confidence from the dispatcher's source (the
        simulator). ``run_s``: how long the batch ran, booked to its queries and its worker (default:
        the profile's time, ``batch.service_s``).
        """
        if confidences is not None and len(confidences) != len(batch.queries):
            raise ValueError(f"{len(confidences)} confidences for a batch of {len(batch.queries)}")
        self._free(batch, now, batch.service_s if run_s is None else run_s)
        if run_s is not None:  # a measured time: correct the estimates batches and deadlines are judged by
            self.service.observe(batch.role, len(batch.queries), batch.with_discriminator, run_s)
            self._refresh_times(batch.role)
        woken: list[int] = []
        draw = self._draw_overhead  # per query when the overhead is sampled; else one answer time for all
        answered = now + self.answer_overhead_s
        if batch.with_discriminator:
            if confidences is None:
                if self.confidences is None:
                    raise ValueError("a light batch completed without confidences, and the dispatcher has no source")
                confidence_of = self.confidences.of
            threshold = batch.threshold
            for i, q in enumerate(batch.queries):
                c = confidence_of(q.prompt_id) if confidences is None else confidences[i]
                q.confidence = c
                if defers(c, threshold):
                    q.deferred = True
                    target = self._enter_stage(q, "heavy", now)
                    if target is not None:
                        woken.append(target)
                else:
                    q.finish("completed", answered if draw is None else now + draw(), "light")
                    self.finished += 1
        else:
            role = batch.role
            for q in batch.queries:
                q.finish("completed", answered if draw is None else now + draw(), role)
            self.finished += len(batch.queries)
        return woken

    def _fall_back(self, query: Query, now: float, *, queued: bool = True) -> None:
        """Answer deferred ``query`` with its light image now (fallback ``light``): completed, served light.
        ``queued``: it is in a queue, and the time it waited there for the heavy stage (none when it falls
        back as it is deferred) is queueing time."""
        if queued:
            query.queue_s += now - query.enqueued_s
        draw = self._draw_overhead
        query.finish("completed", now + (self.answer_overhead_s if draw is None else draw()), "light")
        self.finished += 1

    def _fall_back_late(self, worker: int, free_at_s: float, now: float) -> int:
        """Answer light the deferred queries of heavy ``worker``'s queue whose heavy image would be late
        (:func:`late_deferred`, the worker next free at ``free_at_s``); returns how many."""
        late = late_deferred(self.queues[worker], free_at_s, self._stage_settings["heavy"][0], self._promise_s,
                             self._answer_promise_s)
        for q in late:
            self._fall_back(q, now)
        return len(late)

    def _promise_s(self, n: int) -> float:
        """The time of a heavy batch of ``n`` a deferred query is promised its heavy image on (fallback
        ``light``): the cautious estimate, as admission promises (a late heavy image is a violation, an
        image served light is not)."""
        return self.service.cautious("heavy", n, False)

    def _free_at(self, worker: int, now: float) -> float:
        """When ``worker`` can next start a batch: after its running batch (by the current estimate) and any
        model swap, not before ``now``."""
        t = max(now, self.ready_at[worker])
        if self.inflight[worker]:
            t = max(t, self.busy_until[worker] + (self.swap_s if self.swap_pending[worker] else 0.0))
        return t

    def fail_batch(self, batch: Batch, now: float, error: str, *, run_s: Optional[float] = None) -> None:
        """A batch raised: each of its queries ends ``failed`` with ``error`` -- but with fallback ``light``
        a deferred query of a heavy batch is answered with the light image it has (it lost only its heavy
        one); the worker is freed as by :meth:`complete_batch` (``run_s`` as there) and takes its next batch."""
        self._free(batch, now, batch.service_s if run_s is None else run_s)
        for q in batch.queries:
            if self.light_fallback and batch.role == "heavy" and q.deferred:
                self._fall_back(q, now, queued=False)  # its wait and the failed batch are booked already
            else:
                q.finish("failed", now, error=error)
                self.finished += 1

    def _free(self, batch: Batch, now: float, run_s: float) -> None:
        """The batch is over: book its time, free its worker, start a swap that waited for it."""
        w = batch.worker
        self.inflight[w] = 0
        self._load_changed(w)
        self.busy_s[w] += run_s
        for q in batch.queries:
            q.service_s += run_s
        if self.swap_pending[w]:
            self._start_swap(w, now)

    # -- plans and roles ------------------------------------------------------------------------

    def apply_plan(self, plan: Plan, now: float, *, preloaded: bool = False) -> None:
        """Switch to ``plan``: assign roles with the fewest switches, re-route the queued work of
        switching workers, and move backlog to stages that now have workers.

        ``preloaded``: the workers already hold the models of their new roles (the start of a run).
        """
        live = [w for w in range(self.gpus) if self.in_service[w]]
        if plan.gpus_used > len(live):
            raise ValueError(f"the plan uses {plan.gpus_used} workers but {len(live)} of {self.gpus} are in service")
        old = list(self.roles)
        new: list[Optional[Role]] = [None] * self.gpus
        for w, role in zip(live, assign_roles([old[w] for w in live], plan.light.workers, plan.heavy.workers)):
            new[w] = role
        self.plan = plan
        self._stage_settings = {}
        for role in STAGES:
            self._refresh_times(role)
        moved: list[tuple[Query, Role]] = []
        for w in switched(old, new):
            if old[w] is not None:
                moved.extend((q, old[w]) for q in self.queues[w])
                self.queues[w].clear()
                self._load_changed(w)
            self.roles[w] = new[w]
            if preloaded:
                self.loaded[w] = new[w]
                self.swap_pending[w] = False
            elif needs_swap(self.loaded[w], new[w]):
                if self.inflight[w]:
                    self.swap_pending[w] = True
                else:
                    self._start_swap(w, now)
            else:
                self.swap_pending[w] = False
        self.stage_workers = {role: [w for w, r in enumerate(self.roles) if r == role] for role in STAGES}
        self._stages_changed()
        for q, role in moved:
            self._place(q, role, now)
        for role in STAGES:
            backlog = self.backlog[role]
            if backlog and self.stage_workers[role]:
                self.backlog[role] = deque()
                for q in backlog:
                    self._place(q, role, now)

    def _refresh_times(self, role: Role) -> None:
        """The stage's batch size and its batch times for n = 0..b under the plan and current estimates."""
        plan = self.plan
        b = max(1, plan.stage(role).batch_size)
        with_disc = role == "light" and plan.mode == "cascade"
        times = [0.0]  # a stage without workers never forms a batch
        if plan.stage(role).workers:
            times += [self.service(role, n, with_disc) for n in range(1, b + 1)]
        self._stage_settings[role] = (b, with_disc, times)

    def busy_remaining_s(self, role: Role, now: float) -> float:
        """Until the stage's first worker can start a new batch (its running batch by the current estimate,
        or a model swap); 0 when one is idle or the stage has no worker."""
        best = float("inf")
        for w in self.stage_workers[role]:
            busy_until = max(self.busy_until[w] if self.inflight[w] else 0.0, self.ready_at[w])
            best = min(best, max(0.0, busy_until - now))
        return 0.0 if best == float("inf") else best

    # -- workers leaving and returning -----------------------------------------------------------

    def remove_worker(self, worker: int, now: float, running: Optional[Batch] = None) -> list[int]:
        """Take ``worker`` out of service: it leaves its stage's routing set, its queued queries are
        re-routed to the stage's other workers (or its backlog), and ``running`` -- the batch it was
        running when it was lost, if any -- goes back to the front of its stage: those queries did not
        fail, they are served again. Returns the workers to wake. Its role returns with a later plan
        after :meth:`restore_worker`."""
        if not self.in_service[worker]:
            raise ValueError(f"worker {worker} is already out of service")
        if running is not None and running.worker != worker:
            raise ValueError(f"batch of worker {running.worker} handed back as worker {worker}'s")
        if running is None and self.inflight[worker]:
            raise ValueError(f"worker {worker} has a batch running: hand it back, or end it first")
        self.in_service[worker] = False
        role = self.roles[worker]
        self.roles[worker] = None
        self.swap_pending[worker] = False
        if role is not None:
            self.stage_workers[role] = [w for w in self.stage_workers[role] if w != worker]
            self._stages_changed()
        woken: set[int] = set()
        if running is not None:
            self.inflight[worker] = 0
            self._load_changed(worker)
            for q in reversed(running.queries):  # appended at the front: keep their order
                q.stages.pop()
                q.batch_sizes.pop()
                q.enqueued_s = now
                target = self._place(q, running.role, now, front=True)
                if target is not None:
                    woken.add(target)
        queued = list(self.queues[worker])
        self.queues[worker].clear()
        self._load_changed(worker)
        for q in queued:
            target = self._place(q, role, now)
            if target is not None:
                woken.add(target)
        return sorted(woken)

    def restore_worker(self, worker: int) -> None:
        """``worker`` is back in service, without a role: the next plan may give it one."""
        if self.in_service[worker]:
            raise ValueError(f"worker {worker} is in service already")
        self.in_service[worker] = True

    def workers_in_service(self) -> int:
        return sum(self.in_service)

    def _load_changed(self, worker: int) -> None:
        """The one place a worker's load (queued + in flight) reaches least-loaded routing: called after
        every change to ``queues[worker]`` or ``inflight[worker]``, so the routing index is never stale."""
        if self._index is not None:
            self._index.set(worker, len(self.queues[worker]) + self.inflight[worker])

    def _stages_changed(self) -> None:
        """The one place a change of ``stage_workers`` reaches least-loaded routing (it rebuilds its heaps)."""
        if self._index is not None:
            self._index.set_groups(self.stage_workers)

    def _start_swap(self, worker: int, now: float) -> None:
        self.swap_pending[worker] = False
        self.loaded[worker] = self.roles[worker]
        self.ready_at[worker] = now + self.swap_s

    # -- controller inputs ----------------------------------------------------------------------

    def expire_backlog(self, now: float) -> int:
        """Drop backlog queries that could no longer finish in time; returns how many."""
        count = 0
        for role in STAGES:
            backlog = self.backlog[role]
            if not backlog:
                continue
            with_disc = role == "light" and self.plan.mode == "cascade"
            min_service = self.service(role, 1, with_disc)
            keep: deque[Query] = deque()
            for q in backlog:
                if expired(q, now, min_service, self.limit_s):
                    q.finish("dropped", now)
                    count += 1
                else:
                    keep.append(q)
            self.backlog[role] = keep
        self.finished += count
        return count

    def expire_queued(self, now: float) -> int:
        """Drop queued queries (worker queues and backlogs) that could no longer finish in time even if a
        batch of one started now, and with fallback ``light`` answer deferred ones whose heavy image would
        come after their SLO deadline with their light image; returns how many queries it ended. The
        server runs this every fraction of a second so that a hopeless request is answered when its time
        is up, not when it reaches a worker."""
        count = self.expire_backlog(now)
        for w, queue in enumerate(self.queues):
            role = self.roles[w]
            if not queue or role is None:
                continue
            if self.light_fallback and role == "heavy":
                late = self._fall_back_late(w, self._free_at(w, now), now)
                if late:
                    count += late
                    self._load_changed(w)
                if not queue:
                    continue
            with_disc = role == "light" and self.plan.mode == "cascade"
            min_service = self.service(role, 1, with_disc)
            if not any(expired(q, now, min_service, self.limit_s) for q in queue):
                continue
            keep = [q for q in queue if not expired(q, now, min_service, self.limit_s)]
            for q in queue:
                if q.outcome is None and expired(q, now, min_service, self.limit_s):
                    q.finish("dropped", now)
                    count += 1
                    self.finished += 1
            queue.clear()
            queue.extend(keep)
            self._load_changed(w)
        return count

    def holding(self) -> int:
        """Queries queued, in backlog or running: those not yet ended that the dispatcher holds."""
        # map, not a generator expression: this reads every worker's queue on every controller tick
        return sum(map(len, self.queues)) + sum(self.inflight) + sum(map(len, self.backlog.values()))

    def queue_lengths(self) -> tuple[int, int]:
        """Queued (not running) queries per stage, (light, heavy), backlog included."""
        queues = self.queues
        return tuple(  # type: ignore[return-value]
            sum([len(queues[w]) for w in self.stage_workers[role]]) + len(self.backlog[role])
            for role in STAGES
        )

    def tick_stats(self) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """Since the last call: new arrivals, and queries entering each stage (light, heavy); plus the
        current queue lengths per stage. Resets the counters."""
        arrivals = self._tick_arrivals
        stage = (self._tick_stage["light"], self._tick_stage["heavy"])
        self._tick_arrivals = 0
        self._tick_stage = {"light": 0, "heavy": 0}
        return arrivals, self.queue_lengths(), stage
