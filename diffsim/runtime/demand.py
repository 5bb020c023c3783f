"""Demand estimation: an EWMA of per-tick arrival rates, times a head-room factor.

The DiffServe artifact takes the pandas ``ewm(com=2.1).mean()`` of the last 20 one-second rate samples
and plans for that times 1.05. pandas' default (``adjust=True``) is the weighted mean with weights
``(1 - alpha)**age``, normalised over the samples present, so the first sample alone is its own
estimate and there is no start-up bias towards zero. :class:`DemandEstimator` computes exactly that.
"""

from __future__ import annotations

from collections import deque
from typing import Optional


class DemandEstimator:
    """Fed one arrival-rate sample (queries/s) per controller tick; no clock inside."""

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

    def update(self, rate_qps: float) -> float:
        """Add one sample; returns the new estimate (before head-room)."""
        if rate_qps < 0:
            raise ValueError(f"an arrival rate cannot be negative, got {rate_qps}")
        self._samples.append(float(rate_qps))
        return self.estimate_qps  # type: ignore[return-value]

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
