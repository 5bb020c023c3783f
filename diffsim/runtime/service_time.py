"""What a batch really takes, in the simulator: the profile's p50, or a draw around it.

A real batch does not take its profile's p50 every time: its time varies from call to call, and the
profiles measured by ``diffsim profile`` record that spread as p95 and p99 per batch size. With
``--service-time sampled`` the simulator draws each batch's time from a **log-normal distribution** whose
median is the profile's p50 and whose spread is fitted to the p95 and p99 the profile gives (least squares
on log(pq / p50) = sigma * z_q; p95 alone or p99 alone where only one was measured; no spread where
neither was, as in the artifact's A100 profile, whose percentiles are equal). The log-normal is the usual
model of a positive time with a right tail; with the percentiles fitted it reproduces them by
construction (``tests/test_service_time.py`` checks it on draws).

Where the profile says batch times are correlated in time (``batch_time_correlation``: a shared or
contended host has slow spells), each draw's standard normal is ``sqrt(share) x slow + sqrt(1 - share) x
noise``, ``slow`` an AR(1) process of correlation ``rho`` from one batch to the next: still a standard
normal, so every batch size keeps its p50 / p95 / p99, but slow batches come in runs.

The light stage's time is the model's plus the discriminator's; its percentiles are taken as the sums of
the two tables' percentiles (an upper bound of the sum's, as the two are positively correlated on one GPU).

Draws come from a generator of their own, seeded with the run's seed, so a seed still fixes every
result, and the router's random choices are the same whether times are sampled or not. With ``p50`` no
random number is drawn and results are those of a fixed-time simulator.

The request overhead (what a client waits beyond the server's queueing and batches: HTTP, JSON and
base64, the server's event loop) is drawn the same way, per completed query, by :func:`request_overhead`:
a log-normal whose median is the profile's ``overheads.request_ms`` and whose sigma is fitted to its
``request_p95_ms`` / ``request_p99_ms``, from a second stream of its own (so sampling it changes no router
choice and no batch time); the median as a constant with ``p50``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from ..errors import DiffsimError
from ..plan import Role
from ..profiles import Cascade

SERVICE_TIME_MODES = ("p50", "sampled")
Z95 = 1.6448536269514722  # standard normal quantiles
Z99 = 2.3263478740408408
_STREAM = 0x5E1F  # the batch-time draws' own stream of the run's seed
_OVERHEAD_STREAM = 0x0E4D  # the request overheads' own stream
_BLOCK = 4096


def lognormal_sigma(p50: float, p95: Optional[float], p99: Optional[float]) -> float:
    """The log-normal sigma whose p95 / p99 (relative to the median p50) fit the given ones; 0 without any."""
    points = [(z, q) for z, q in ((Z95, p95), (Z99, p99)) if q is not None and q > p50 > 0]
    if not points:
        return 0.0
    return sum(z * math.log(q / p50) for z, q in points) / sum(z * z for z, _ in points)


def _quantile_sum(cascade: Cascade, role: Role, n: int, with_disc: bool, q: str) -> Optional[float]:
    table = cascade.light if role == "light" else cascade.heavy
    if q != "p50" and getattr(table, f"{q}_ms") is None:
        return None
    ms = table.latency_ms(n, q)
    if ms is None:
        return None
    if with_disc:
        if q != "p50" and getattr(cascade.discriminator, f"{q}_ms") is None:
            d = cascade.discriminator.latency_ms(n, "p50")
        else:
            d = cascade.discriminator.latency_ms(n, q)
        if d is None:
            return None
        ms += d
    return ms


class ServiceTimeModel:
    """Draws batch times for the simulator (see the module docstring)."""

    def __init__(self, cascade: Cascade, mode: str = "p50", seed: int = 0):
        if mode not in SERVICE_TIME_MODES:
            raise DiffsimError(f"unknown service-time mode {mode!r} (choose from {', '.join(SERVICE_TIME_MODES)})")
        self.cascade = cascade
        self.mode = mode
        self._rng = np.random.default_rng([seed, _STREAM])
        self._z: list[float] = []
        self._next = 0
        self._params: dict[tuple[str, int, bool], tuple[float, float]] = {}
        c = cascade.batch_time_correlation
        # (sqrt(share), sqrt(1 - share), rho, sqrt(1 - rho^2)): the weights of each draw, computed once
        self._correlation = None if c is None or c.share == 0.0 else (
            math.sqrt(c.share), math.sqrt(1.0 - c.share), c.rho, math.sqrt(1.0 - c.rho * c.rho))
        self._slow: Optional[float] = None
        # The host's state when the profile has batch_time_contention (sampled times only): workers running
        # a batch, and when the last batch ended (how long the host had been idle before one that runs alone).
        self._contention = cascade.batch_time_contention if mode == "sampled" else None
        self._busy = 0
        self._last_end = -math.inf

    def params(self, role: Role, n: int, with_disc: bool) -> tuple[float, float]:
        """(median in s, log-normal sigma) of a batch of n at this stage."""
        key = (role, n, with_disc)
        p = self._params.get(key)
        if p is None:
            p50 = _quantile_sum(self.cascade, role, n, with_disc, "p50")
            if p50 is None:
                raise DiffsimError(f"the profile has no latency for the {role} stage at batch size {n}")
            sigma = lognormal_sigma(p50, _quantile_sum(self.cascade, role, n, with_disc, "p95"),
                                    _quantile_sum(self.cascade, role, n, with_disc, "p99"))
            p = self._params[key] = (p50 / 1e3, sigma)
        return p

    def draw(self, role: Role, n: int, with_disc: bool) -> float:
        """Seconds one batch of n takes this time."""
        median, sigma = self.params(role, n, with_disc)
        if self.mode == "p50" or sigma == 0.0:
            return median
        if self._correlation is not None:
            return median * math.exp(sigma * self._correlated_z())
        return median * math.exp(sigma * self._normal())

    def start(self, role: Role, n: int, with_disc: bool, now: float) -> float:
        """Seconds a batch of n starting at ``now`` takes: :meth:`draw`, scaled by the profile's
        batch_time_contention at the host's state then (workers running a batch, this one included, and
        for one that runs alone the host's idle time before it). Each start is followed by :meth:`end`."""
        t = self.draw(role, n, with_disc)
        if self._contention is None:
            return t
        self._busy += 1
        idle_s = now - self._last_end if self._busy == 1 else 0.0
        return self._contention.at(self._busy, idle_s) * t

    def end(self, now: float) -> None:
        """A batch started with :meth:`start` ended (or was lost) at ``now``."""
        if self._contention is not None:
            self._busy -= 1
            self._last_end = now

    def _normal(self) -> float:
        i = self._next
        if i == len(self._z):
            self._z = self._rng.standard_normal(_BLOCK).tolist()
            i = 0
        self._next = i + 1
        return self._z[i]

    def _correlated_z(self) -> float:
        """A standard normal, ``sqrt(share) x slow + sqrt(1 - share) x noise`` with ``slow`` an AR(1) of
        correlation ``rho`` from one batch (of any stage) to the next (the host's state)."""
        slow_w, noise_w, rho, innovation_w = self._correlation
        e = self._normal()
        self._slow = e if self._slow is None else rho * self._slow + innovation_w * e
        return slow_w * self._slow + noise_w * self._normal()


Z999 = 3.090232306167813  # the normal's 99.9th percentile


class LogNormalDraws:
    """A callable drawing one value (seconds) from a log-normal of this median and sigma, from its own
    generator, a block of standard normals at a time. Draws beyond the fitted p99.9 are taken as it: a
    log-normal fitted to a measured p99 of a few stalls would otherwise, once in thousands of requests,
    add tens of seconds nobody measured (the p50, p95 and p99 are unchanged)."""

    def __init__(self, median_s: float, sigma: float, rng: np.random.Generator):
        self.median_s = median_s
        self.sigma = sigma
        self._rng = rng
        self._values: list[float] = []
        self._next = 0

    def __call__(self) -> float:
        i = self._next
        if i == len(self._values):
            z = np.minimum(self._rng.standard_normal(_BLOCK), Z999)
            self._values = (self.median_s * np.exp(self.sigma * z)).tolist()
            i = 0
        self._next = i + 1
        return self._values[i]


def request_overhead(cascade: Cascade, mode: str = "p50", seed: int = 0) -> "float | LogNormalDraws":
    """What a completed query waits beyond its batches (HTTP, encoding, the event loop), in seconds, for
    the dispatcher: the profile's ``overheads.request_ms`` as a constant with ``p50`` (or where the profile
    gives no spread); with ``sampled`` a :class:`LogNormalDraws` of that median, its sigma fitted to
    ``request_p95_ms`` / ``request_p99_ms`` as batch times are (:func:`lognormal_sigma`), drawing from a
    stream of the run's seed of its own -- so the router's choices and the batch-time draws are the same
    whether the overhead is sampled or not."""
    if mode not in SERVICE_TIME_MODES:
        raise DiffsimError(f"unknown service-time mode {mode!r} (choose from {', '.join(SERVICE_TIME_MODES)})")
    o = cascade.overheads
    median_s = o.request_ms / 1e3
    sigma = lognormal_sigma(o.request_ms, o.request_p95_ms, o.request_p99_ms)
    if mode == "p50" or sigma == 0.0:
        return median_s
    return LogNormalDraws(median_s, sigma, np.random.default_rng([seed, _OVERHEAD_STREAM]))
