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

Only the first stage is predicted; a query deferred to the heavy stage later is protected by the drop
rule there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
