"""Batch formation and the drop rule, from a worker's FIFO queue.

Eager batching, as in the DiffServe testbed: an idle worker takes up to b queued queries at once and
never waits to fill a batch -- unless a batching timeout is set, in which case it waits until b queries
are queued or the oldest has waited ``timeout_s`` (:func:`batch_ready`).

Drop rule, applied at dequeue: a query is dropped when ``(now - arrival) + batch service time`` exceeds
``drop_factor x SLO`` (default 1.5): it could not finish in time anyway, and serving it would delay
others. The service time a candidate is checked against is that of the batch it would run in if every
query still queued behind it were kept (``min(b, taken + 1 + still queued)``); it only shrinks as queries
are dropped, so a kept query was checked against a batch at least as large as the one it runs in.

Queries waiting in a stage's backlog (a stage with no worker) are checked at each controller tick with
:func:`expired`, against the time of a batch of one.

Light fallback (``fallback: light``, off by default): a deferred query already has its light image, so
one whose heavy image could no longer be ready by its SLO deadline is answered with the light image
instead of being served late or dropped. The rule (:func:`late_deferred`) predicts when each deferred
query in a heavy worker's FIFO queue would finish, from when the worker is next free and the batch times
(eager batches of ``b``: the query at position i runs in round ``i // b``, after ``i // b`` full batches;
its own batch holds the queries queued with it now, at most ``b``), and returns those predicted past
``arrival + SLO``. The dispatcher applies it wherever a deferred query could wait for a heavy image it
will not get in time: when it is deferred (it is not queued), when a heavy batch is formed, and at the
deadline sweep. The light path is what every query's on-time answer then rests on; the heavy stage's
tail costs quality (images served light), not SLO violations.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from ..errors import DiffsimError
from ..plan import Role
from ..profiles import Cascade
from ..query import Query

FALLBACKS = ("none", "light")  # what a deferred query that cannot be served heavy in time gets


def service_time_s(cascade: Cascade, role: Role, batch_size: int, with_discriminator: bool) -> float:
    """p50 time of one batch: the stage's model, plus the discriminator for a light batch in cascade mode."""
    table = cascade.light if role == "light" else cascade.heavy
    ms = table.latency_ms(batch_size)
    if ms is None:
        model = cascade.light_model if role == "light" else cascade.heavy_model
        raise DiffsimError(f"the profile has no latency for {model} at batch size {batch_size}")
    if with_discriminator:
        d = cascade.discriminator.latency_ms(batch_size)
        if d is None:
            raise DiffsimError(f"the profile has no discriminator latency at batch size {batch_size}")
        ms += d
    return ms / 1e3


class ServiceTimes:
    """The batch times the runtime forms batches, drops queries and admits new ones with.

    Seeded from the profile (:func:`service_time_s`, cached per (role, batch size, discriminator)) and
    corrected online by what batches actually take: one factor per stage, an EWMA (weight ``alpha``) of
    measured / profile time over the batches that stage completed, applied to every batch size. A real
    server's batches run slower than the profile's p50 when every worker is busy, and the PNG encoding
    and transport are not in the profile; one factor per stage learns that from the first few batches and
    keeps the profile's shape across batch sizes. The simulator reports the times it draws (``--service-time
    sampled``), and, where it judges batches by another profile than the one they run at or from a
    carried-over estimate (``diffsim validate``), its p50 times too; otherwise its times stay the
    profile's.

    Admission promises on a *cautious* time (:meth:`cautious`): the factor plus ``k`` times the EWMA
    (weight ``beta``) of the measured ratio's absolute deviation from it -- the estimator TCP sets its
    retransmission timeout with (Jacobson/Karels: smoothed value + 4 x mean deviation; ``k`` = 2 here,
    as a batch time is not a round trip whose late arrival is fatal). Steady batch times keep it close to
    the factor; when they jump (a burst's event-loop hand-offs, contention) it widens at once while the
    factor is still catching up, so admission does not promise on an estimate that is about to rise. The
    drop rule and batch formation keep the plain estimate.

    Two guards keep a wrong estimate from locking the server out. One batch moves the factor by at most
    ``jump`` times (its ratio is clamped to [factor / jump, factor x jump] before the EWMA): a single stall
    -- a 4.7 s batch where 0.1 s is usual was seen -- is not taken as the new normal. And the estimate of
    a batch of one never exceeds the drop limit ``limit_s`` (nor falls below the profile): were it to, every
    query would be refused or dropped, no batch would run, and no measurement could ever correct it; at
    the cap an idle stage still takes one query at a time and so measures again.
    """

    def __init__(self, cascade: Cascade, alpha: float = 0.2, beta: float = 0.25, k: float = 2.0,
                 jump: float = 3.0, limit_s: Optional[float] = None):
        self.cascade = cascade
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self.jump = jump
        self.limit_s = limit_s
        self.factor = {"light": 1.0, "heavy": 1.0}
        self.deviation = {"light": 0.0, "heavy": 0.0}
        self.observed = {"light": 0, "heavy": 0}
        self._ratio_sum = {"light": 0.0, "heavy": 0.0}  # for the mean over every batch (mean_ratio)
        self._cache: dict[tuple[str, int, bool], float] = {}
        self._caps: dict[tuple[str, bool], float] = {}  # (role, discriminator) -> the factor's cap

    def profile_s(self, role: Role, batch_size: int, with_discriminator: bool) -> float:
        key = (role, batch_size, with_discriminator)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = service_time_s(self.cascade, role, batch_size, with_discriminator)
        return t

    def _capped(self, role: Role, with_discriminator: bool, factor: float) -> float:
        """``factor``, at most what lets the smallest batch the profile has (one, usually) fit the drop limit
        (never below 1)."""
        if self.limit_s is None or factor <= 1.0:
            return factor
        cap = self._caps.get((role, with_discriminator))
        if cap is None:
            table = self.cascade.light if role == "light" else self.cascade.heavy
            smallest = table.min_batch_size()  # 1, usually
            cap = max(1.0, self.limit_s / self.profile_s(role, smallest, with_discriminator) * (1 - 1e-9))  # fits
            self._caps[(role, with_discriminator)] = cap
        return min(factor, cap)

    def __call__(self, role: Role, batch_size: int, with_discriminator: bool) -> float:
        factor = self._capped(role, with_discriminator, self.factor[role])
        return self.profile_s(role, batch_size, with_discriminator) * factor

    def cautious(self, role: Role, batch_size: int, with_discriminator: bool) -> float:
        """The batch time admission promises on: the estimate widened by ``k`` mean deviations."""
        factor = self._capped(role, with_discriminator, self.factor[role] + self.k * self.deviation[role])
        return self.profile_s(role, batch_size, with_discriminator) * factor

    def observe(self, role: Role, batch_size: int, with_discriminator: bool, measured_s: float) -> None:
        """A batch of ``batch_size`` of this stage took ``measured_s``."""
        expected = self.profile_s(role, batch_size, with_discriminator)
        if expected <= 0 or not measured_s > 0:
            return
        ratio = measured_s / expected
        factor = self.factor[role]
        error = min(max(ratio, factor / self.jump), factor * self.jump) - factor
        self.deviation[role] += self.beta * (abs(error) - self.deviation[role])
        self.factor[role] += self.alpha * error
        self.observed[role] += 1
        self._ratio_sum[role] += ratio

    def state(self) -> dict[str, dict[str, float]]:
        """The estimate as it stands, per stage: the factor and its mean deviation (``GET /v1/plan``)."""
        return {"factor": dict(self.factor), "deviation": dict(self.deviation)}

    def start_from(self, factor: dict[str, float], deviation: dict[str, float]) -> None:
        """Go on from an estimate another run left, per stage (``diffsim validate`` simulates a run from the
        estimate the server held at its start: a server's estimate carries over from one run to the next)."""
        for role in ("light", "heavy"):
            f, d = float(factor.get(role, 1.0)), float(deviation.get(role, 0.0))
            if not (f > 0 and d >= 0):
                raise ValueError(f"service-time estimate of the {role} stage: factor {f!r} (> 0), deviation {d!r} (>= 0)")
            self.factor[role], self.deviation[role] = f, d

    def mean_ratio(self) -> dict[str, Optional[float]]:
        """Per stage, the mean of measured / profile time over every batch so far (None: none measured):
        how much slower than its profile the stage really ran (``diffsim validate`` scales the profile
        it simulates with by it)."""
        return {role: (self._ratio_sum[role] / n if n else None) for role, n in self.observed.items()}


def batch_ready(queue_length: int, oldest_enqueued_s: float, now: float, batch_size: int,
                timeout_s: float) -> Optional[float]:
    """None when a batch should start now, else the time to look again (batching timeout only)."""
    if queue_length == 0:
        raise ValueError("no batch can form from an empty queue")
    if timeout_s <= 0 or queue_length >= batch_size:
        return None
    due = oldest_enqueued_s + timeout_s
    return None if now >= due else due


def form_batch(
    queue: deque[Query],
    now: float,
    batch_size: int,
    service_s: Callable[[int], float],
    limit_s: float,
) -> tuple[list[Query], list[Query]]:
    """Take up to ``batch_size`` queries from the head of ``queue`` (mutated), dropping those that fail.

    ``service_s(n)`` is the time of a batch of n; ``limit_s`` is drop_factor x SLO. Returns
    ``(batch, dropped)`` in queue order; the caller marks the dropped ones and runs the batch.
    Keeps going past drops until the batch is full or the queue is empty.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batch: list[Query] = []
    dropped: list[Query] = []
    n = min(batch_size, len(queue))  # the batch if all still queued were kept
    service = service_s(n) if n else 0.0
    while queue and len(batch) < batch_size:
        q = queue.popleft()
        if (now - q.arrival_s) + service > limit_s:
            dropped.append(q)
            m = min(batch_size, len(batch) + len(queue))
            if 0 < m < n:
                n, service = m, service_s(m)
        else:
            batch.append(q)
    return batch, dropped


def expired(query: Query, now: float, min_service_s: float, limit_s: float) -> bool:
    """Whether a query can no longer finish within the limit even if a batch of one started now."""
    return (now - query.arrival_s) + min_service_s > limit_s


def finish_s(free_at_s: float, position: int, queued: int, batch_size: int, service_s: Callable[[int], float]) -> float:
    """Predicted finish of the query at ``position`` (0-based) of a FIFO queue of ``queued`` queries that a
    worker free at ``free_at_s`` serves in eager batches of up to ``batch_size``: ``position // b`` full
    batches first, then its own batch of the queries queued now (at most ``b``)."""
    if not 0 <= position < queued:
        raise ValueError(f"position {position} outside a queue of {queued}")
    b = max(1, batch_size)
    rounds = position // b
    return free_at_s + rounds * service_s(b) + service_s(min(b, queued - rounds * b))


def misses_deadline(query: Query, free_at_s: float, position: int, queued: int, batch_size: int,
                    service_s: Callable[[int], float], answer_s: float = 0.0) -> bool:
    """Whether ``query``, at ``position`` of a FIFO queue of ``queued`` that a worker free at
    ``free_at_s`` serves (:func:`finish_s`), would be answered (``answer_s`` after its batch) after its SLO
    deadline."""
    return finish_s(free_at_s, position, queued, batch_size, service_s) + answer_s > query.deadline_s


def late_deferred(queue: deque[Query], free_at_s: float, batch_size: int, service_s: Callable[[int], float],
                  answer_s: float = 0.0) -> list[Query]:
    """Remove from ``queue`` (mutated) the deferred queries whose heavy image would come after their SLO
    deadline (:func:`finish_s` plus ``answer_s``, the time an answer takes beyond its batch), and return
    them in queue order: the caller answers them with their light image. Positions are counted without
    the queries removed before them (a query that falls back no longer delays those behind it); other
    queries (not deferred) stay and keep their places."""
    late: list[Query] = []
    if not queue:
        return late
    kept: list[Query] = []
    remaining = len(queue)
    for q in queue:
        remaining -= 1
        position = len(kept)
        if q.deferred and misses_deadline(q, free_at_s, position, position + 1 + remaining, batch_size, service_s,
                                          answer_s):
            late.append(q)
        else:
            kept.append(q)
    if late:
        queue.clear()
        queue.extend(kept)
    return late
