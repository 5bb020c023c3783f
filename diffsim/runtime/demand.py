"""Demand estimation: an EWMA of one sample per controller tick, times a head-room factor.

Which sample is a choice (``demand`` in the run config, ``--demand`` on the command line):

* ``arrival`` (diffsim's default): the tick's arrival rate, queries/s. The plan is made for what is
  arriving, x ``headroom`` (default 1.05).
* ``in-system``: the number of queries in the system at the tick -- admitted and not yet ended (queued,
  running, or waiting in a backlog). This is what the DiffServe artifact's controller plans for
  (``computeSystemEWMA`` in its ``src/controller/controller.py``, as described in the project's issue 13;
  the artifact's source is not shipped here), x 1.2. It is a count, not a rate, used as a rate: by Little's
  law the count is about lambda x W (arrival rate x mean time in the system), so the plan is made for
  about 1.2 x W x lambda -- on the shipped traces about 1.9 x the arrival rate. It over-provisions when
  latency is high and tracks queueing as well as arrivals, which is why it is kept as an option: it is
  the artifact's behaviour, not a better estimator.

Both use the same EWMA: pandas ``ewm(com=2.1).mean()`` (alpha = 1/3.1) over the last 20 samples, as in
the artifact. pandas' default (``adjust=True``) is the weighted mean with weights ``(1 - alpha)**age``,
normalised over the samples present, so the first sample alone is its own estimate and there is no
start-up bias towards zero. :class:`DemandEstimator` computes exactly that; the controller
(:mod:`diffsim.runtime.controller`) decides which sample it is fed.
"""

from __future__ import annotations

from collections import deque
from itertools import repeat
from typing import Optional

DEMAND_KINDS = ("arrival", "in-system")
# The artifact's head-room on its in-system estimate (the arrival estimate's, 1.05, is ControllerConfig's
# default); ``--preset artifact`` sets it.
ARTIFACT_HEADROOM = 1.2


class DemandEstimator:
    """Fed one sample per controller tick (an arrival rate, or an in-system count); no clock inside."""

    def __init__(self, alpha: float = 1 / 3.1, window: int = 20, headroom: float = 1.05):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if headroom <= 0:
            raise ValueError(f"headroom must be > 0, got {headroom}")
        self.alpha = alpha
        self.headroom = headroom
        self._samples: deque[float] = deque(maxlen=window)
        # (1 - alpha)**age for age 0..window-1, oldest last
        self._weights = [(1.0 - alpha) ** age for age in range(window)]

    def update(self, sample: float) -> float:
        """Add one sample (queries/s, or queries in the system); returns the new estimate (before head-room)."""
        if sample < 0:
            raise ValueError(f"a demand sample cannot be negative, got {sample}")
        self._samples.append(float(sample))
        return self.estimate_qps  # type: ignore[return-value]

    def add_zeros(self, count: int) -> None:
        """Add ``count`` samples of 0 (idle ticks) at the cost of at most ``window`` of them: older ones
        would leave the window anyway. The same state as ``count`` calls of ``update(0)``."""
        self._samples.extend(repeat(0.0, min(count, self._samples.maxlen)))

    def held(self) -> list[float]:
        """The samples held, oldest first (a controller's state: :meth:`~diffsim.runtime.controller.Controller.state`)."""
        return list(self._samples)

    def restore(self, samples) -> None:
        """Hold ``samples`` (oldest first; the newest ``window`` of them) in place of the ones held."""
        values = [float(x) for x in samples]
        if any(not x >= 0 for x in values):
            raise ValueError(f"demand samples must be >= 0, got {values!r}")
        self._samples.clear()
        self._samples.extend(values)

    @property
    def all_zero(self) -> bool:
        """At least one sample, and every sample held is 0: the estimate is 0 and more zeros keep it 0."""
        return bool(self._samples) and not any(self._samples)

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def estimate_qps(self) -> Optional[float]:
        """Bias-corrected EWMA of the samples held; None before the first sample."""
        if not self._samples:
            return None
        num = den = 0.0
        for w, x in zip(self._weights, reversed(self._samples)):
            num += w * x
            den += w
        return num / den

    def demand_qps(self, fallback_qps: float = 0.0) -> float:
        """The demand to plan for: estimate x head-room (``fallback_qps`` x head-room before any sample)."""
        est = self.estimate_qps
        return (fallback_qps if est is None else est) * self.headroom
