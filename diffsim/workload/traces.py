"""Workload traces: when each query arrives and which prompt it carries.

A :class:`Trace` is two parallel arrays sorted by arrival time (plus optional prompt texts and per-query
image seeds). It is read from and written to two CSV formats, both described in ``traces/README.md``:

* **artifact** -- the DiffServe artifact's files: lines ``arrival_ms,prompt_id``, no header, not
  necessarily sorted;
* **diffsim** -- the project's own: an optional ``# diffsim-trace v1`` marker line, then a header naming
  the columns (``arrival_s,prompt_id`` first, then optionally ``prompt`` and ``seed``), arrival times in
  seconds written with ``repr`` so that a write/read round trip is exact.

In both, ``#`` comment lines and blank lines are allowed between records, rows may come in any order and
are sorted stably by arrival time. Anything else malformed raises :class:`~diffsim.errors.InputError`
with one line naming the file and the line number; nothing is skipped silently.

The seeded generators (Poisson, Gamma burstiness, rate-curve shapes) live in
:mod:`diffsim.workload.trace_generators`, which imports this module (never the other way round).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import DiffsimError, InputError
from ..limits import MAX_ARRIVAL_S

FORMATS = ("diffsim", "artifact")
DIFFSIM_MARKER = "# diffsim-trace v1"
DIFFSIM_COLUMNS = ("arrival_s", "prompt_id", "prompt", "seed")  # the order the writer uses
REQUIRED_COLUMNS = ("arrival_s", "prompt_id")


@dataclass(frozen=True)
class Trace:
    """Arrivals sorted ascending, in seconds from the trace start, with the prompt each one carries.

    ``prompt`` holds prompt texts and ``seed`` per-query image seeds where the source has them. The
    arrays are made read-only so that a trace, once built, cannot change under a simulation.
    """

    arrival_s: np.ndarray
    prompt_id: np.ndarray
    prompt: Optional[tuple[str, ...]] = None
    source: str = ""
    seed: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        arrival = np.array(self.arrival_s, dtype=np.float64).reshape(-1)
        ids = np.array(self.prompt_id, dtype=np.int64).reshape(-1)
        n = len(arrival)
        if len(ids) != n:
            raise ValueError(f"trace has {n} arrival times but {len(ids)} prompt ids")
        if n and not np.all(np.isfinite(arrival)):
            raise ValueError("trace arrival times must be finite")
        if n and arrival[0] < 0:
            raise ValueError("trace arrival times must be >= 0")
        if np.any(np.diff(arrival) < 0):
            raise ValueError("trace arrival times must be sorted ascending")
        prompt = None if self.prompt is None else tuple(str(p) for p in self.prompt)
        if prompt is not None and len(prompt) != n:
            raise ValueError(f"trace has {n} arrivals but {len(prompt)} prompt texts")
        seed = None if self.seed is None else np.array(self.seed, dtype=np.int64).reshape(-1)
        if seed is not None and len(seed) != n:
            raise ValueError(f"trace has {n} arrivals but {len(seed)} seeds")
        for a in (arrival, ids, seed):
            if a is not None:
                a.setflags(write=False)
        object.__setattr__(self, "arrival_s", arrival)
        object.__setattr__(self, "prompt_id", ids)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "seed", seed)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time of the last arrival (traces start at 0); 0 for an empty trace."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def mean_rate_qps(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0


def sorted_trace(
    arrival_s: Sequence[float],
    prompt_id: Sequence[int],
    *,
    prompt: Optional[Sequence[str]] = None,
    seed: Optional[Sequence[int]] = None,
    source: str = "",
) -> Trace:
    """A trace from rows in any order, sorted stably by arrival (rows with equal times keep their order)."""
    arrival = np.asarray(arrival_s, dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    return Trace(
        arrival_s=arrival[order],
        prompt_id=np.asarray(prompt_id, dtype=np.int64)[order],
        prompt=None if prompt is None else tuple(prompt[i] for i in order),
        seed=None if seed is None else np.asarray(seed, dtype=np.int64)[order],
        source=source,
    )


def window_counts(trace: Trace, window_s: float) -> np.ndarray:
    """Arrivals per window [k*w, (k+1)*w), from 0 up to the window holding the last arrival."""
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    if not len(trace):
        return np.zeros(0, dtype=np.int64)
    bins = np.floor(trace.arrival_s / window_s).astype(np.int64)
    return np.bincount(bins, minlength=int(bins[-1]) + 1)


# ----------------------------------------------------------------------------------------------- reading


class _Lines:
    """Feeds physical lines to :func:`csv.reader`, skipping comment and blank lines where a record starts.

    A quoted prompt may span lines, so "where a record starts" is known only from the reader's progress:
    the reader pulls its first line for a record right after it has returned the previous one, which the
    consumer signals by counting records. A continuation line that begins with ``#`` is therefore kept.
    """

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.next_index = 0
        self.record_start = 0  # 1-based line number where the current record starts
        self.records_seen = 0  # incremented by the consumer after each record
        self._records_at_pull = -1

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        at_start = self._records_at_pull != self.records_seen
        self._records_at_pull = self.records_seen
        while self.next_index < len(self.lines):
            line = self.lines[self.next_index]
            self.next_index += 1
            if not at_start:
                return line
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                self.record_start = self.next_index
                return line
        raise StopIteration


def csv_records(path: str, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each CSV record, comment and blank lines between records left out."""
    feed = _Lines(lines)
    reader = csv.reader(feed, strict=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise InputError(f"{path}: line {feed.record_start}: bad CSV quoting ({e})") from None
        feed.records_seen += 1
        yield feed.record_start, row


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_time(where: str, name: str, text: str, scale: int = 0) -> float:
    """A time field in seconds; ``scale`` -3 reads milliseconds (the artifact's ``arrival_ms``).

    Milliseconds are converted by moving the decimal point, so ``304.706`` ms becomes exactly the float
    nearest 0.304706 s (a division by 1000 would give 0.30470600000000003). Times are finite, >= 0 and
    at most :data:`diffsim.limits.MAX_ARRIVAL_S` seconds.
    """
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {name} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: {name} {text.strip()!r} is not a finite number")
    if value < 0:
        raise InputError(f"{where}: {name} {text.strip()} is negative")
    if scale:
        value = float(Decimal(text.strip().replace("_", "")).scaleb(scale))
    if value > MAX_ARRIVAL_S:
        raise InputError(f"{where}: {name} {text.strip()} is beyond {MAX_ARRIVAL_S:,.0f} s, the longest a trace may last")
    return value


def _parse_count(where: str, name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{where}: {name} {text.strip()!r} is not an integer") from None
    if value < 0:
        raise InputError(f"{where}: {name} {value} is negative")
    if value >= 2**63:
        raise InputError(f"{where}: {name} {value} is too large (at most 2**63-1)")
    return value


def _header(where: str, row: list[str]) -> list[str]:
    columns = [c.strip() for c in row]
    for c in columns:
        if c not in DIFFSIM_COLUMNS:
            hint = " (an artifact trace has no header)" if c == "arrival_ms" else ""
            raise InputError(f"{where}: unknown header column {c!r}; known: {', '.join(DIFFSIM_COLUMNS)}{hint}")
    for c in columns:
        if columns.count(c) > 1:
            raise InputError(f"{where}: header column {c!r} appears twice")
    for c in REQUIRED_COLUMNS:
        if c not in columns:
            raise InputError(f"{where}: header lacks the required column {c!r}")
    if tuple(columns[:2]) != REQUIRED_COLUMNS:
        # so that a record never starts with prompt text, which could look like a '#' comment
        raise InputError(f"{where}: the header must start with {','.join(REQUIRED_COLUMNS)}")
    return columns


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """Parse the text of a trace file in either format (see the module docstring)."""
    lines = io.StringIO(text, newline="").readlines()  # splits at \n, \r\n or \r only, as CSV does
    marker = lines[0].strip() if lines else ""
    has_marker = marker.startswith("# diffsim-trace")
    if has_marker and marker != DIFFSIM_MARKER:
        raise InputError(
            f"{source}: line 1: unsupported format marker {marker!r}; this diffsim reads {DIFFSIM_MARKER!r}"
        )

    columns: Optional[list[str]] = None  # None: artifact format
    arrival: list[float] = []
    ids: list[int] = []
    prompts: list[str] = []
    seeds: list[int] = []
    first = True
    for line_no, row in csv_records(source, lines):
        where = f"{source}: line {line_no}"
        if first:
            first = False
            if not any(_is_number(field) for field in row):
                columns = _header(where, row)
                continue
            if has_marker:
                raise InputError(
                    f"{where}: expected the header line (e.g. arrival_s,prompt_id,prompt) after {DIFFSIM_MARKER!r}"
                )
        if columns is None:
            if len(row) != 2:
                raise InputError(f"{where}: expected 2 fields arrival_ms,prompt_id, found {len(row)}")
            arrival.append(_parse_time(where, "arrival_ms", row[0], scale=-3))
            ids.append(_parse_count(where, "prompt_id", row[1]))
            continue
        if len(row) != len(columns):
            raise InputError(f"{where}: expected {len(columns)} fields ({','.join(columns)}), found {len(row)}")
        fields = dict(zip(columns, row))
        arrival.append(_parse_time(where, "arrival_s", fields["arrival_s"]))
        ids.append(_parse_count(where, "prompt_id", fields["prompt_id"]))
        if "prompt" in fields:
            prompts.append(fields["prompt"])
        if "seed" in fields:
            seeds.append(_parse_count(where, "seed", fields["seed"]))

    if not arrival:
        if columns is not None:
            what = "no requests after the header"
        else:
            what = "no requests (only comments and blank lines)" if text.strip() else "no requests (the file is empty)"
        raise InputError(f"{source}: line {max(1, len(lines))}: {what}")
    has_prompt = columns is not None and "prompt" in columns
    has_seed = columns is not None and "seed" in columns
    return sorted_trace(
        arrival,
        ids,
        prompt=prompts if has_prompt else None,
        seed=seeds if has_seed else None,
        source=source,
    )


def read_trace(path) -> Trace:
    """Read a trace file in the artifact format or the project's own (detected from its first lines)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such trace file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a trace file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text") from None
    return parse_trace(text, source=str(path))


# ----------------------------------------------------------------------------------------------- writing


def format_trace(trace: Trace, fmt: str = "diffsim", *, drop_extra: bool = False) -> str:
    """The text of a trace file. The artifact format has no prompt texts or seeds: dropping them must be
    asked for (``drop_extra``); its times are written in milliseconds to the microsecond."""
    if fmt not in FORMATS:
        raise DiffsimError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not len(trace):
        raise DiffsimError("refusing to write an empty trace (it has no requests)")
    out = io.StringIO()
    if fmt == "artifact":
        if (trace.prompt is not None or trace.seed is not None) and not drop_extra:
            raise DiffsimError(
                "the artifact format cannot hold prompt texts or seeds; "
                "leave them out explicitly (diffsim trace convert --drop-prompts)"
            )
        for t, pid in zip(trace.arrival_s.tolist(), trace.prompt_id.tolist()):
            out.write(f"{t * 1000.0:.3f},{pid}\n")
        return out.getvalue()
    columns = ["arrival_s", "prompt_id"]
    if trace.prompt is not None:
        columns.append("prompt")
    if trace.seed is not None:
        columns.append("seed")
    out.write(DIFFSIM_MARKER + "\n")
    out.write(",".join(columns) + "\n")
    arrivals = trace.arrival_s.tolist()
    ids = trace.prompt_id.tolist()
    seeds = trace.seed.tolist() if trace.seed is not None else None
    for i in range(len(trace)):
        row = [repr(float(arrivals[i])), str(ids[i])]
        if trace.prompt is not None:
            row.append(_quoted(trace.prompt[i]))
        if seeds is not None:
            row.append(str(seeds[i]))
        out.write(",".join(row) + "\n")
    return out.getvalue()


def _quoted(text: str) -> str:
    """A prompt as one CSV field, always quoted: safe for commas, quotes and any line break."""
    return '"' + text.replace('"', '""') + '"'


def write_trace(trace: Trace, path, fmt: str = "diffsim", *, drop_extra: bool = False) -> None:
    """Write ``trace`` to ``path`` in the project's format (exact round trip) or the artifact's."""
    text = format_trace(trace, fmt, drop_extra=drop_extra)
    path = Path(path)
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    except OSError as e:
        raise DiffsimError(f"{path}: cannot write ({e.strerror})") from None


__all__ = [
    "DIFFSIM_MARKER",
    "FORMATS",
    "Trace",
    "csv_records",
    "format_trace",
    "parse_trace",
    "read_trace",
    "sorted_trace",
    "window_counts",
    "write_trace",
]
