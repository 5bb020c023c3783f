"""Admission control: refuse a query at once when it could not finish in time anyway.

The rule (pure: no clock inside, the caller passes ``now``): a new query is rejected when its predicted
completion ``now + queue wait + service time`` would come later than ``arrival + drop_factor x SLO``,
the same limit the drop rule (:mod:`diffsim.runtime.batching`) applies at dequeue. Refusing at the door (HTTP
429 with ``Retry-After``) is kinder than queueing a request only to drop it later, and it keeps the
queue short enough for the requests that can still be served.

Queue wait estimate for a stage (:func:`queue_wait_s`): a new query waits for the stage's first worker
to free up (``busy_remaining_s``: 0 when one is idle), then for the full batch rounds ahead of it --
``queued // (workers x batch_size)`` rounds of one batch each. Service time is that of the batch it
would run in. A stage with no worker (the plan gives it none) cannot serve it: the wait is infinite.

The whole path (:func:`predict`): in cascade mode a new query may be deferred, so when the plan in force
defers a fraction f > 0 it must also be able to finish on the heavy stage: it reaches the heavy stage
when its light batch ends, behind the heavy queue and the f share of the light work ahead of it (which
will be deferred before it), and the decision is taken on that later completion. Refusing at the door
what the heavy stage cannot serve keeps the accepted requests' promise; the controller meanwhile lowers
the threshold (fewer deferrals) or moves workers. With the dispatcher's light fallback a deferred query
is answered light when its heavy image would be late, so only its light path is predicted. Batch times
are the dispatcher's cautious estimates: the profile corrected by measured batch times and widened by
their recent spread (:meth:`~diffsim.runtime.batching.ServiceTimes.cautious`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .dispatcher import Dispatcher


@dataclass(frozen=True)
class StageLoad:
    """What a stage looks like to a new query."""

    workers: int  # workers serving the stage
    batch_size: int  # the plan's batch size for the stage
    queued: int  # queries already waiting for the stage (backlog included), ahead of the new one
    busy_remaining_s: float  # until the stage's first worker is free (0 when one is idle)


@dataclass(frozen=True)
class Decision:
    accept: bool
    predicted_completion_s: float  # may be inf
    deadline_s: float  # arrival + drop_factor x SLO
    retry_after_s: float  # 0 when accepted; else how long until the prediction would fit (>= 1 s)


def queue_wait_s(load: StageLoad, batch_service_s: float) -> float:
    """Predicted wait before a new query's batch starts (see the module docstring)."""
    if load.workers <= 0:
        return math.inf
    per_round = load.workers * max(1, load.batch_size)
    rounds = load.queued // per_round
    return max(0.0, load.busy_remaining_s) + rounds * batch_service_s


def batch_size_for_new(load: StageLoad) -> int:
    """The size of the batch a new query would run in: what is queued ahead in its round, plus itself."""
    b = max(1, load.batch_size)
    if load.workers <= 0:
        return 1
    in_round = load.queued % (load.workers * b)
    return min(b, in_round // load.workers + 1)


def decide(now: float, arrival_s: float, wait_s: float, service_s: float, slo_s: float,
           drop_factor: float) -> Decision:
    """Accept unless ``now + wait + service > arrival + drop_factor x SLO``."""
    deadline = arrival_s + drop_factor * slo_s
    predicted = now + wait_s + service_s
    if predicted <= deadline:
        return Decision(True, predicted, deadline, 0.0)
    excess = predicted - deadline
    retry = max(1.0, math.ceil(excess)) if math.isfinite(excess) else max(1.0, math.ceil(slo_s))
    return Decision(False, predicted, deadline, retry)


def predict(d: "Dispatcher", first_stages: Sequence[str], now: float, slo_s: float,
            drop_factor: float) -> Decision:
    """The admission decision for new queries arriving now, whose first stages are ``first_stages``.

    The last new query of each first stage waits longest, so all are accepted iff each stage's last one
    is; its completion is predicted over the whole path it may take (see the module docstring).
    """
    plan = d.plan
    queued = dict(zip(("light", "heavy"), d.queue_lengths()))
    extra = {"light": 0, "heavy": 0}
    for role in first_stages:
        extra[role] += 1
    worst = Decision(True, now, now + drop_factor * slo_s, 0.0)
    for role in ("light", "heavy"):
        if not extra[role]:
            continue
        ahead = queued[role] + extra[role] - 1
        done = _stage_completion(d, role, ahead, now)
        if role == "light" and plan.mode == "cascade" and plan.deferral_fraction > 0 and not d.light_fallback:
            # A deferred query reaches the heavy stage when its light batch ends, behind the heavy queue
            # and the share of the light work ahead of it that will be deferred first.
            light_ahead = ahead + sum(d.inflight[w] for w in d.stage_workers["light"])
            heavy_ahead = queued["heavy"] + math.ceil(plan.deferral_fraction * light_ahead)
            done = max(done, _stage_completion(d, "heavy", heavy_ahead, now, not_before=done))
        decision = decide(now, now, done - now, 0.0, slo_s, drop_factor)
        if not decision.accept:
            return decision
        if decision.predicted_completion_s > worst.predicted_completion_s:
            worst = decision
    return worst


def _stage_completion(d: "Dispatcher", role: str, ahead: int, now: float, not_before: float = 0.0) -> float:
    """When a query with ``ahead`` queries before it at ``role`` would finish there (inf: no worker)."""
    plan = d.plan
    b = max(1, plan.stage(role).batch_size)
    with_disc = role == "light" and plan.mode == "cascade"
    load = StageLoad(len(d.stage_workers[role]), b, ahead, d.busy_remaining_s(role, now))
    wait = queue_wait_s(load, d.service.cautious(role, b, with_disc))
    if math.isinf(wait):
        return math.inf
    start = max(now + wait, not_before)
    return start + d.service.cautious(role, batch_size_for_new(load), with_disc)
