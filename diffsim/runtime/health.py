"""Worker health: which workers are in service, and when one is taken out or brought back. No clock.

A worker leaves service in one of two ways, and both end the same way in the dispatcher
(:meth:`~diffsim.runtime.dispatcher.Dispatcher.remove_worker`: its running batch back to the front of its
stage, its queue re-routed, no role until a plan gives it one) and in the controller (it re-plans for
the workers in service at the next tick):

* **lost**: the worker itself is gone -- its process or node died, or it did not answer a batch within
  its stall limit (:func:`stall_limit_s`). The batch it was running did not fail: it is served again
  elsewhere. It comes back when the driver reaches it again (a restarted Ray actor; the simulator's
  ``--recover-worker``) and a probe succeeds.
* **failing**: its executor raised on ``max_failures`` batches in a row. Those batches did fail (their
  queries end ``failed``: an executor error is an answer, not a loss); without this rule a worker that
  fails fast looks idle to least-loaded routing and draws the traffic. It is probed every ``probe_s``
  and comes back at the first probe that succeeds.

:class:`WorkerHealth` keeps the state per worker; the driver supplies ``now`` and does the probing.
"""

from __future__ import annotations

from typing import Literal, Optional

from ..config import HealthConfig

State = Literal["up", "failing", "lost"]


def stall_limit_s(config: HealthConfig, batch_service_s: float) -> float:
    """How long a batch may run before its worker is taken for lost: ``stall_factor`` x its profile
    time, and never less than ``stall_min_s`` (a profile can be optimistic; a first call can be slow)."""
    return max(config.stall_min_s, config.stall_factor * batch_service_s)


class WorkerHealth:
    """State of each worker: ``up`` (in service), ``failing`` or ``lost`` (out of service)."""

    def __init__(self, workers: int, config: HealthConfig = HealthConfig()):
        self.config = config
        self.state: list[State] = ["up"] * workers
        self.consecutive_failures = [0] * workers
        self.reason: list[str] = [""] * workers  # why it is out of service
        self.since_s: list[float] = [0.0] * workers  # when it entered its state
        self.next_probe_s: list[Optional[float]] = [None] * workers
        self.removals = 0  # times a worker left service
        self.returns = 0  # times a worker came back

    def in_service(self, worker: int) -> bool:
        return self.state[worker] == "up"

    def count_in_service(self) -> int:
        return sum(s == "up" for s in self.state)

    def batch_succeeded(self, worker: int) -> None:
        self.consecutive_failures[worker] = 0

    def batch_failed(self, worker: int, now: float, error: str) -> bool:
        """An executor error on ``worker``. True when this failure takes it out of service (the
        ``max_failures``-th in a row); the caller then removes it from the dispatcher."""
        if self.state[worker] != "up":
            return False
        self.consecutive_failures[worker] += 1
        if self.consecutive_failures[worker] < self.config.max_failures:
            return False
        self._leave(worker, "failing", now,
                    f"{self.consecutive_failures[worker]} batches failed in a row; last: {error}")
        return True

    def lost(self, worker: int, now: float, reason: str) -> bool:
        """The worker is gone. True when it was in service (the caller removes it from the dispatcher);
        False when it already was out (a second report of the same loss)."""
        was_up = self.state[worker] == "up"
        if self.state[worker] != "lost":
            self._leave(worker, "lost", now, reason)
        return was_up

    def probe_due(self, worker: int, now: float) -> bool:
        t = self.next_probe_s[worker]
        return t is not None and now >= t

    def probe_failed(self, worker: int, now: float, error: str) -> None:
        """A probe did not succeed: try again ``probe_s`` later."""
        self.reason[worker] = f"{self.reason[worker].split('; probe:')[0]}; probe: {error}"
        self.next_probe_s[worker] = now + self.config.probe_s

    def back(self, worker: int, now: float) -> bool:
        """A probe succeeded: the worker is in service again (the caller restores it in the dispatcher).
        False when it was in service already."""
        if self.state[worker] == "up":
            return False
        self.state[worker] = "up"
        self.consecutive_failures[worker] = 0
        self.reason[worker] = ""
        self.since_s[worker] = now
        self.next_probe_s[worker] = None
        self.returns += 1
        return True

    def _leave(self, worker: int, state: State, now: float, reason: str) -> None:
        if self.state[worker] == "up":
            self.removals += 1
        self.state[worker] = state
        self.reason[worker] = reason
        self.since_s[worker] = now
        self.next_probe_s[worker] = now + self.config.probe_s

    def snapshot(self) -> list[dict]:
        return [{"state": s, "reason": r, "since_s": t, "consecutive_failures": f}
                for s, r, t, f in zip(self.state, self.reason, self.since_s, self.consecutive_failures)]
