"""The bounds of the numbers a user gives diffsim: command-line flags, config files and traces.

Every bound is chosen from what makes sense for a cascade and the machines diffsim can run on, wide
enough for any real scenario and narrow enough that no input makes a command allocate without end or
run for days (a seed of -1, a window of a microsecond, a trace with an arrival at 1e300 s). A
:class:`Range` checks a value, says what it accepts in words (for ``--help`` and for error messages)
and serves as an argparse ``type``; config files use the same ranges through pydantic fields.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Union

Number = Union[int, float]


def _num(value: Number) -> str:
    """A bound as people write it: 10000000, not 1e+07; 0.01 as is."""
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e16):
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Range:
    """Numbers from ``lo`` to ``hi`` (both included unless ``lo_open`` / ``hi_open``), integers only if
    ``integer``."""

    lo: Number
    hi: Number = math.inf
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """What the range accepts, e.g. ``an integer in 1..100000`` or ``a number > 0 and <= 1``."""
        if self.integer:
            if self.hi == math.inf:
                return f"an integer >= {self.lo}"
            return f"an integer in {self.lo}..{self.hi}"
        low = f"> {_num(self.lo)}" if self.lo_open else f">= {_num(self.lo)}"
        if self.hi == math.inf:
            return f"a number {low}"
        return f"a number {low} and {self._high()}"

    def __str__(self) -> str:
        if self.integer:
            return f"{self.lo}..{self.hi}" if self.hi != math.inf else f">= {self.lo}"
        low = f"> {_num(self.lo)}" if self.lo_open else f">= {_num(self.lo)}"
        return low if self.hi == math.inf else f"{low}, {self._high()}"

    def _high(self) -> str:
        return f"< {_num(self.hi)}" if self.hi_open else f"<= {_num(self.hi)}"

    def contains(self, value: object) -> bool:
        """True for a value of the right type inside the range (booleans are not numbers here)."""
        if isinstance(value, bool):
            return False
        if self.integer:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def parse(self, text: str) -> Number:
        """The number ``text`` spells, inside the range; ValueError with a one-line reason otherwise."""
        try:
            value: Number = int(text.strip(), 10) if self.integer else float(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if not self.contains(value):
            raise ValueError(f"must be {self.describe()}, got {text!r}")
        return value

    def __call__(self, text: str) -> Number:
        """argparse ``type=``: the error names the flag (argparse adds it) and the range."""
        try:
            return self.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def pydantic(self) -> dict:
        """Keyword arguments of ``pydantic.Field`` for the same bounds."""
        bounds: dict = {"gt" if self.lo_open else "ge": self.lo}
        if self.hi != math.inf:
            bounds["lt" if self.hi_open else "le"] = self.hi
        return bounds


# Cluster and run
GPUS = Range(1, 100_000, integer=True)
WORKER_INDEX = Range(0, GPUS.hi - 1, integer=True)
WORKERS = Range(0, GPUS.hi, integer=True)  # workers of one stage
SEED = Range(0, 2**32 - 1, integer=True)  # what numpy's and the router's generators take
BATCH_SIZE = Range(1, 4096, integer=True)
LATENCY_MS = Range(0.001, 1e7)  # one batch, in a GPU profile: from a microsecond to about 3 hours
MAX_BATCH_SIZES = 64  # entries in a list of allowed batch sizes
FRACTION = Range(0, 1)  # thresholds, batch_wait
FRACTION_ABOVE_0 = Range(0, 1, lo_open=True)  # max_utilization, ewma_alpha
QUANTILE = Range(0, 1, lo_open=True, hi_open=True)  # tail_quantile: the 0th and 100th percentiles plan nothing
DROP_FACTOR = Range(0, 100, lo_open=True)
HEADROOM = Range(0, 100, lo_open=True)
SLO_S = Range(0, 86_400, lo_open=True)
DEMAND_QPS = Range(0, 1e7)
QUEUE_DELAY_S = Range(0, 86_400)
SECONDS = Range(0, 1e7)  # a time inside a run (a fault's time)
DELAY_S = Range(0, 3600)  # a wait inside a run: a batch timeout, a model swap (simulated time passes meanwhile)
TICK_S = Range(0.01, 3600)  # the controller's tick and re-plan periods
REPLAN_S = Range(0.01, 1e7)
EWMA_WINDOW = Range(1, 100_000, integer=True)
STABILIZATION_S = Range(0, 1e7)  # the window of past demand a role switch must carry
JOBS = Range(1, 1024, integer=True)

# Time series: windows of at least 10 ms, at most a million of them over a run
WINDOW_S = Range(0.01, 1e7)
MAX_WINDOWS = 1_000_000

# Traces: arrival times finite and at most 1e7 s (about 116 days); at most 10 million requests generated
MAX_ARRIVAL_S = 1e7
MAX_TRACE_REQUESTS = 10_000_000
RATE_QPS = Range(0, 1e7, lo_open=True)
DURATION_S = Range(0, MAX_ARRIVAL_S, lo_open=True)
PROMPT_ID = Range(0, 2**63 - 1, integer=True)
CV = Range(0, 100)  # coefficient of variation of Gamma inter-arrival gaps
INTERVALS = Range(1, 10_000_000, integer=True)  # intervals of a rate curve
INTERVALS_OR_ZERO = Range(0, 10_000_000, integer=True)
RATE_OR_ZERO = Range(0, 1e7)

# Server and measurements
PORT = Range(0, 65_535, integer=True)
THREADS = Range(1, 1024, integer=True)
COUNT = Range(1, 1_000_000, integer=True)  # iterations, epochs, images per request, samples
COUNT_OR_ZERO = Range(0, 1_000_000, integer=True)
MIN_PERIOD_S = 0.001  # the shortest period of anything that repeats in a run
PERIOD_S = Range(MIN_PERIOD_S, 86_400)  # probe and poll periods, quality windows, client timeouts
IMAGES_PER_REQUEST = Range(1, 1000, integer=True)
RESTARTS = Range(-1, 1_000_000, integer=True)  # -1: always
TIME_SCALE = Range(0, 1e6, lo_open=True)  # a load generator's multiplier of arrival times
REPEATS = Range(1, 100, integer=True)  # real runs of one trace (diffsim validate)
