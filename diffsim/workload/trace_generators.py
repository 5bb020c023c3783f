"""Seeded workload generators: constant-rate Poisson, Gamma burstiness, and rate-curve shapes.

Every generator takes a ``seed`` and draws from ``numpy.random.default_rng(seed)`` only, so the same
arguments always give the same trace (the shipped ``traces/*.csv`` are checked against this). The
generator's stream is split in two (arrival times, prompt ids) so that changing the prompt-id range does
not move the arrival times. Arrival times are rounded to the microsecond: files stay short and the
artifact format (milliseconds, three decimals) holds them as well.

A *shape* trace follows a per-interval rate curve, min-max scaled to [lo, hi] queries per second, with
Poisson arrivals inside each interval -- how the DiffServe artifact turns the hourly Azure Functions 2019
invocation shape into a trace (one hour of the shape becomes one second of trace). The built-in curves
are defined analytically here; a measured curve can be read from a file with :func:`read_rates`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import limits
from ..errors import DiffsimError, InputError
from ..textfile import text_lines
from .traces import Trace, csv_records

DEFAULT_PROMPT_IDS = (1, 4999)  # the artifact's range of MS-COCO prompt ids
TIME_RESOLUTION_DECIMALS = 6  # arrival times are rounded to 1 microsecond
MIN_CV = 1e-6  # a smaller cv is treated as 0 (evenly spaced): below the time resolution for gaps under 1 s


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise DiffsimError(f"{name} must be a positive number, got {value}")
    return value


def _check_size(expected_requests: float, duration_s: float, what: str) -> None:
    """A trace must fit the bounds every reader applies (:mod:`diffsim.limits`): at most
    MAX_TRACE_REQUESTS requests (expected) and MAX_ARRIVAL_S seconds; refused before anything is drawn."""
    if duration_s > limits.MAX_ARRIVAL_S:
        raise DiffsimError(f"{what} lasts {duration_s:g} s, longer than the {limits.MAX_ARRIVAL_S:,.0f} s a trace may last")
    if expected_requests > limits.MAX_TRACE_REQUESTS:
        raise DiffsimError(f"{what} would hold about {expected_requests:.3g} requests, more than the "
                           f"{limits.MAX_TRACE_REQUESTS:,} a trace may hold: lower the rate or the duration")


def _check_prompt_ids(prompt_ids: Sequence[int]) -> tuple[int, int]:
    if len(prompt_ids) != 2:
        raise DiffsimError(f"prompt_ids must be an inclusive range (first, last), got {prompt_ids!r}")
    lo, hi = int(prompt_ids[0]), int(prompt_ids[1])
    if lo < 0 or hi < lo:
        raise DiffsimError(f"prompt_ids range {lo}..{hi} must satisfy 0 <= first <= last")
    return lo, hi


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(arrival-time stream, prompt-id stream), both derived from ``default_rng(seed)``."""
    arrivals, ids = np.random.default_rng(seed).spawn(2)
    return arrivals, ids


def _finish(arrival_s: np.ndarray, end_s: float, id_rng: np.random.Generator, prompt_ids: tuple[int, int],
            source: str) -> Trace:
    """Round to the time resolution, keep arrivals inside [0, end_s) (rounding can reach end_s), draw ids."""
    arrival_s = np.round(arrival_s, TIME_RESOLUTION_DECIMALS)
    arrival_s = arrival_s[arrival_s < end_s]
    ids = id_rng.integers(prompt_ids[0], prompt_ids[1], endpoint=True, size=len(arrival_s), dtype=np.int64)
    return Trace(arrival_s=arrival_s, prompt_id=ids, source=source)


# ------------------------------------------------------------------------------------- renewal processes


def gamma_trace(
    rate_qps: float, cv: float, duration_s: float, *, seed: int, prompt_ids: Sequence[int] = DEFAULT_PROMPT_IDS
) -> Trace:
    """Arrivals over [0, duration_s) whose gaps are Gamma with mean 1/rate and coefficient of variation cv.

    cv = 1 is a Poisson process; cv > 1 is burstier (clusters and lulls); cv < 1 is more regular, and
    cv = 0 (or below MIN_CV) spaces arrivals exactly 1/rate apart.
    """
    rate_qps = _check_positive("rate_qps", rate_qps)
    duration_s = _check_positive("duration_s", duration_s)
    cv = float(cv)
    if not limits.CV.contains(cv):
        raise DiffsimError(f"cv must be {limits.CV.describe()}, got {cv}")
    _check_size(rate_qps * duration_s, duration_s, f"rate {rate_qps:g} qps over {duration_s:g} s")
    ids = _check_prompt_ids(prompt_ids)
    arrival_rng, id_rng = _streams(seed)

    if cv < MIN_CV:
        draw = lambda n: np.full(n, 1.0 / rate_qps)  # noqa: E731
    else:
        shape = 1.0 / cv**2
        draw = lambda n: arrival_rng.gamma(shape, 1.0 / (rate_qps * shape), size=n)  # noqa: E731
    expected = rate_qps * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # one chunk nearly always covers the duration
    pieces, t = [], 0.0
    while t < duration_s:
        times = t + np.cumsum(draw(chunk))
        pieces.append(times)
        t = float(times[-1])
    arrival = np.concatenate(pieces)
    name = "poisson" if cv == 1 else f"gamma cv={cv:g}"
    return _finish(arrival, duration_s, id_rng, ids, f"{name} rate={rate_qps:g} duration={duration_s:g} seed={seed}")


def poisson_trace(
    rate_qps: float, duration_s: float, *, seed: int, prompt_ids: Sequence[int] = DEFAULT_PROMPT_IDS
) -> Trace:
    """Constant-rate Poisson arrivals over [0, duration_s): exponential gaps, i.e. Gamma with cv = 1."""
    return gamma_trace(rate_qps, 1.0, duration_s, seed=seed, prompt_ids=prompt_ids)


# ------------------------------------------------------------------------------------------ rate shapes


def scale_rates(rates: Sequence[float], lo_qps: float, hi_qps: float) -> np.ndarray:
    """Min-max scale a rate curve to [lo, hi] qps: its minimum becomes lo and its maximum hi.

    A constant curve has no shape to scale; it maps to hi everywhere (it is at its maximum throughout).
    """
    r = np.asarray(rates, dtype=np.float64).reshape(-1)
    if len(r) == 0:
        raise DiffsimError("the rate curve is empty")
    if not np.all(np.isfinite(r)):
        raise DiffsimError("the rate curve has a value that is not a finite number")
    lo, hi = float(lo_qps), float(hi_qps)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise DiffsimError(f"rates must be scaled to 0 <= lo <= hi, got lo={lo:g} hi={hi:g}")
    span = r.max() - r.min()
    if span == 0:
        return np.full(len(r), hi)
    return lo + (r - r.min()) / span * (hi - lo)


def shape_trace(
    rates: Sequence[float],
    lo_qps: float,
    hi_qps: float,
    *,
    interval_s: float = 1.0,
    seed: int,
    prompt_ids: Sequence[int] = DEFAULT_PROMPT_IDS,
) -> Trace:
    """Arrivals following ``rates`` (one value per interval), min-max scaled to [lo, hi] qps.

    Interval i covers [i*interval_s, (i+1)*interval_s); its arrivals are a Poisson process at the
    scaled rate (a Poisson count, placed uniformly). The trace lasts len(rates) * interval_s.
    """
    interval_s = _check_positive("interval_s", interval_s)
    scaled = scale_rates(rates, lo_qps, hi_qps)
    _check_size(float(scaled.sum()) * interval_s, len(scaled) * interval_s,
                f"a curve of {len(scaled)} intervals of {interval_s:g} s at {lo_qps:g}..{hi_qps:g} qps")
    ids = _check_prompt_ids(prompt_ids)
    arrival_rng, id_rng = _streams(seed)
    counts = arrival_rng.poisson(scaled * interval_s)
    starts = np.repeat(np.arange(len(scaled), dtype=np.float64) * interval_s, counts)
    arrival = np.sort(starts + arrival_rng.random(len(starts)) * interval_s)
    source = f"shape intervals={len(scaled)} interval={interval_s:g}s lo={lo_qps:g} hi={hi_qps:g} seed={seed}"
    return _finish(arrival, len(scaled) * interval_s, id_rng, ids, source)


DIURNAL_PEAK_HOUR = 15.0  # mid-afternoon peak ...
DIURNAL_CONCENTRATION = 1.5  # ... and how sharp it is (von Mises concentration; trough at 03:00)


def diurnal_shape(intervals: int) -> np.ndarray:
    """One day of load in ``intervals`` steps: exp(k cos(2 pi (h - 15) / 24)) at each step's mid-hour h.

    A smooth, periodic curve with a single peak at 15:00 and a trough at 03:00 (peak/trough = e^(2k));
    after min-max scaling its mean sits about a third of the way from lo to hi (0.334 for 360 steps).
    """
    hours = 24.0 * (np.arange(intervals) + 0.5) / intervals
    return np.exp(DIURNAL_CONCENTRATION * np.cos(2 * np.pi * (hours - DIURNAL_PEAK_HOUR) / 24.0))


def ramp_shape(intervals: int) -> np.ndarray:
    """A linear rise from the lowest to the highest rate: how far can the system scale up in time."""
    return np.linspace(0.0, 1.0, intervals)


def step_shape(intervals: int) -> np.ndarray:
    """Low for the first half, high for the second: the controller's step response."""
    return (np.arange(intervals) >= intervals / 2).astype(np.float64)


BUILTIN_SHAPES: dict[str, Callable[[int], np.ndarray]] = {
    "diurnal": diurnal_shape,
    "ramp": ramp_shape,
    "step": step_shape,
}


def builtin_shape(name: str, intervals: int) -> np.ndarray:
    if name not in BUILTIN_SHAPES:
        raise DiffsimError(f"unknown built-in shape {name!r}; choose one of {', '.join(BUILTIN_SHAPES)}")
    if intervals < 2:
        raise DiffsimError(f"a built-in shape needs at least 2 intervals, got {intervals}")
    return BUILTIN_SHAPES[name](int(intervals))


def read_rates(path, column: Optional[str] = None) -> np.ndarray:
    """A rate curve from a file: one number per line, or a CSV column (by header name or 1-based index).

    ``#`` comments and blank lines are allowed; a first line with no numbers is a header. A file with
    several columns needs ``column``. Rates must be finite and >= 0.
    """
    path = Path(path)
    lines = list(text_lines(path, "rate file"))  # a curve is short: one line per interval
    header: Optional[list[str]] = None
    index: Optional[int] = None
    width: Optional[int] = None
    rates: list[float] = []
    for line_no, row in csv_records(str(path), lines):
        where = f"{path}: line {line_no}"
        row = [field.strip() for field in row]
        if width is None:
            width = len(row)
            if not any(_is_float(field) for field in row):
                header = row
                index = _column_index(where, header, column)
                continue
            index = _column_index(where, None, column, width)
        if len(row) != width:
            raise InputError(f"{where}: expected {width} fields, found {len(row)}")
        text_value = row[index]
        try:
            value = float(text_value)
        except ValueError:
            raise InputError(f"{where}: rate {text_value!r} is not a number") from None
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{where}: rate {text_value} must be a finite number >= 0")
        rates.append(value)
    if not rates:
        raise InputError(f"{path}: line {max(1, len(lines))}: no rates in the file")
    return np.asarray(rates, dtype=np.float64)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column_index(where: str, header: Optional[list[str]], column: Optional[str], width: Optional[int] = None) -> int:
    n = len(header) if header is not None else int(width or 0)
    if column is None:
        if n != 1:
            raise InputError(f"{where}: the file has {n} columns; choose one (by name or 1-based number)")
        return 0
    if header is not None and column in header:
        return header.index(column)
    if column.isdigit() and 1 <= int(column) <= n:
        return int(column) - 1
    known = f"; header: {', '.join(header)}" if header is not None else ""
    raise InputError(f"{where}: no column {column!r} among {n} columns{known}")
