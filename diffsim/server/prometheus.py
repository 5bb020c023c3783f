"""Prometheus metrics of one server, in a registry of its own (two servers in one process never mix).

Counters are fed by the engine's hooks as queries end and batches finish; gauges (queues, workers,
threshold, demand; with ``--fid-reference`` the served-image FID of the last closed window) are refreshed
from the engine's state each time ``/metrics`` is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..runtime.dispatcher import STAGES
from ..reports.metrics import OUTCOMES
from ..query import Query
from .engine import Engine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The ``diffsim_*`` metrics of one engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("diffsim_http_requests", "HTTP requests answered, by route and status code",
                                     ["route", "code"], registry=r)
        self.queries = Counter("diffsim_queries", "Queries (one per image) by final outcome: completed, dropped, "
                               "failed, rejected", ["outcome"], registry=r)
        self.violations = Counter("diffsim_slo_violations", "Queries that missed the SLO (late, or not served)",
                                  registry=r)
        self.late = Counter("diffsim_late", "Queries completed after the SLO", registry=r)
        self.deferred = Counter("diffsim_deferred", "Queries deferred from the light to the heavy model",
                                registry=r)
        self.fallback_light = Counter("diffsim_fallback_light", "Deferred queries answered with their light "
                                      "image (the light fallback: the heavy one would have been late)", registry=r)
        self.served = Counter("diffsim_served", "Completed queries by the stage that served them", ["stage"],
                              registry=r)
        self.latency = Histogram("diffsim_query_latency_seconds", "Arrival to answer of completed queries",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("diffsim_query_queue_seconds", "Time completed queries spent in queues",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("diffsim_batch_size", "Queries per batch run", ["stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_time = Histogram("diffsim_batch_seconds", "Measured time of one batch", ["stage"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.failed_batches = Counter("diffsim_failed_batches", "Batches whose executor raised", ["stage"],
                                      registry=r)
        self.queue_length = Gauge("diffsim_queue_length", "Queries waiting per stage (backlog included)",
                                  ["stage"], registry=r)
        self.workers = Gauge("diffsim_workers", "Workers per stage under the plan in force", ["stage"], registry=r)
        self.batch_size_plan = Gauge("diffsim_plan_batch_size", "Batch size per stage under the plan in force",
                                     ["stage"], registry=r)
        self.threshold = Gauge("diffsim_threshold", "Confidence threshold of the plan in force", registry=r)
        self.plan_feasible = Gauge("diffsim_plan_feasible", "1 when the plan in force meets its constraints",
                                   registry=r)
        self.plans = Gauge("diffsim_plans_applied", "Plans applied since start", registry=r)
        self.demand = Gauge("diffsim_demand_qps", "Demand the controller plans for (EWMA x head-room)", registry=r)
        self.arrival_rate = Gauge("diffsim_arrival_rate_qps", "Arrival rate measured over the last tick", registry=r)
        self.pending = Gauge("diffsim_pending_queries", "Admitted queries without an outcome yet", registry=r)
        self.in_service = Gauge("diffsim_workers_in_service", "Workers in service (not lost, not taken out for "
                                "failing)", registry=r)
        self.worker_up = Gauge("diffsim_worker_in_service", "1 while the worker is in service", ["worker"],
                               registry=r)
        self.worker_removals = Gauge("diffsim_worker_removals", "Times a worker left service (lost or failing)",
                                     registry=r)
        self.lost_batches = Gauge("diffsim_lost_batches", "Batches handed back by a lost worker and served again",
                                  registry=r)
        self.busy = Gauge("diffsim_worker_busy_seconds", "Time each worker spent running batches", ["worker"],
                          registry=r)
        self.served_fid = self.served_fid_n = self.served_fid_end = None
        if engine.quality is not None:  # only with --fid-reference
            self.served_fid = Gauge("diffsim_served_fid", "FID of the sampled served images of the last closed "
                                    "window, per stage (NaN: sample too small, see /v1/quality)", ["stage"],
                                    registry=r)
            self.served_fid_n = Gauge("diffsim_served_fid_sample_size", "Images behind diffsim_served_fid",
                                      ["stage"], registry=r)
            self.served_fid_end = Gauge("diffsim_served_fid_window_end_seconds",
                                        "End of the window diffsim_served_fid describes (engine clock)", registry=r)
        # Every labelled count exists from the start, at 0: "none yet" reads as 0, not as a missing series.
        for outcome in OUTCOMES:
            self.queries.labels(outcome)
        for stage in STAGES:
            self.served.labels(stage)
            self.failed_batches.labels(stage)
        engine.on_query.append(self.query_ended)
        engine.on_batch.append(self.batch_ended)

    def query_ended(self, q: Query) -> None:
        self.queries.labels(q.outcome).inc()
        if q.violation:
            self.violations.inc()
        if q.late:
            self.late.inc()
        if q.deferred:
            self.deferred.inc()
        if q.fell_back:
            self.fallback_light.inc()
        if q.outcome == "completed":
            stage = q.served_by or "light"
            self.served.labels(stage).inc()
            self.latency.labels(stage).observe(q.latency_s)
            self.queue_time.observe(q.queue_s)

    def batch_ended(self, role: str, size: int, run_s: float, failed: bool) -> None:
        if failed:
            self.failed_batches.labels(role).inc()
            return
        self.batch_size.labels(role).observe(size)
        self.batch_time.labels(role).observe(run_s)

    def refresh(self) -> None:
        e = self.engine
        d = e.dispatcher
        for stage, n in zip(("light", "heavy"), d.queue_lengths()):
            self.queue_length.labels(stage).set(n)
        plan = d.plan
        if plan is not None:
            for stage in ("light", "heavy"):
                self.workers.labels(stage).set(plan.stage(stage).workers)
                self.batch_size_plan.labels(stage).set(plan.stage(stage).batch_size)
            self.threshold.set(plan.threshold)
            self.plan_feasible.set(1 if plan.feasible else 0)
        self.plans.set(e.plan_id)
        self.demand.set(e.controller.demand_qps)
        self.arrival_rate.set(e.controller.rate_qps)
        self.pending.set(e.pending)
        for w, busy in enumerate(d.busy_s):
            self.busy.labels(str(w)).set(busy)
            self.worker_up.labels(str(w)).set(1 if d.in_service[w] else 0)
        self.in_service.set(d.workers_in_service())
        self.worker_removals.set(e.health.removals)
        self.lost_batches.set(e.lost_batches)
        if self.served_fid is not None:
            window = e.quality.latest()
            if window is not None:
                for stage, q in window.stages.items():
                    self.served_fid.labels(stage).set(float("nan") if q.fid is None else q.fid)
                    self.served_fid_n.labels(stage).set(q.n)
                self.served_fid_end.set(window.end_s)

    def render(self) -> bytes:
        self.refresh()
        return generate_latest(self.registry)
