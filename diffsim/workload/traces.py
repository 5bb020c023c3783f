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

Files are read in chunks of records (:func:`trace_chunks`), so that what does not need the whole trace
at once holds one chunk whatever the file's length: :class:`TraceStats` (``diffsim trace info``) and
:func:`convert_trace` (``diffsim trace convert``, an external merge sort when the rows are out of order).
:func:`read_trace` builds the whole :class:`Trace` from the same chunks; :func:`write_trace` writes a
trace's text a chunk at a time.

The seeded generators (Poisson, Gamma burstiness, rate-curve shapes) live in
:mod:`diffsim.workload.trace_generators`, which imports this module (never the other way round).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import tempfile
from contextlib import closing, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import DiffsimError, InputError
from ..limits import MAX_ARRIVAL_S
from ..textfile import text_lines

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


class WindowCounts:
    """Arrivals per window [k*w, (k+1)*w), from 0 up to the window of the latest arrival, counted chunk by
    chunk from arrivals in any order. Memory grows with the trace's duration (one counter per window:
    at most :data:`~diffsim.limits.MAX_ARRIVAL_S` / w), never with its number of requests."""

    def __init__(self, window_s: float):
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self.window_s = float(window_s)
        self._counts = np.zeros(0, dtype=np.int64)
        self._windows = 0  # windows up to the latest arrival's; _counts may be longer (room to grow)

    def add(self, arrival_s: np.ndarray) -> None:
        if not len(arrival_s):
            return
        bins = np.floor(np.asarray(arrival_s, dtype=np.float64) / self.window_s).astype(np.int64)
        first = int(bins.min())
        counts = np.bincount(bins - first)
        end = first + len(counts)
        if end > len(self._counts):  # grow by a quarter at least: a sorted trace grows it chunk by chunk
            grown = np.zeros(max(end, len(self._counts) * 5 // 4), dtype=np.int64)
            grown[: len(self._counts)] = self._counts
            self._counts = grown
        self._counts[first:end] += counts
        self._windows = max(self._windows, end)

    @property
    def counts(self) -> np.ndarray:
        return self._counts[: self._windows].copy()


def window_counts(trace: Trace, window_s: float) -> np.ndarray:
    """Arrivals per window [k*w, (k+1)*w), from 0 up to the window holding the last arrival."""
    counter = WindowCounts(window_s)
    counter.add(trace.arrival_s)
    return counter.counts


# ----------------------------------------------------------------------------------------------- reading

DEFAULT_CHUNK_ROWS = 65_536  # records parsed into arrays at a time: ~2 MB of arrays, a few MB of text


@dataclass(frozen=True)
class TraceChunk:
    """Consecutive records of a trace file, in file order (not sorted). ``prompt`` and ``seed`` are None
    when the file has no such column; ``chars_read`` counts the characters of the file read so far."""

    arrival_s: np.ndarray
    prompt_id: np.ndarray
    prompt: Optional[list[str]]
    seed: Optional[np.ndarray]
    chars_read: int = 0

    def __len__(self) -> int:
        return len(self.arrival_s)

    def in_order(self) -> bool:
        """Arrival times never decrease inside the chunk."""
        return bool(np.all(self.arrival_s[1:] >= self.arrival_s[:-1]))

    def sorted(self, source: str = "") -> Trace:
        return sorted_trace(self.arrival_s, self.prompt_id, prompt=self.prompt, seed=self.seed, source=source)


class _Lines:
    """Feeds physical lines to :func:`csv.reader`, skipping comment and blank lines where a record starts.

    A quoted prompt may span lines, so "where a record starts" is known only from the reader's progress:
    the reader pulls its first line for a record right after it has returned the previous one, which the
    consumer signals by counting records. A continuation line that begins with ``#`` is therefore kept.
    Lines are pulled one at a time from any iterable (a file is never read ahead).
    """

    def __init__(self, lines: Iterable[str]):
        self._lines = iter(lines)
        self.line_no = 0  # physical lines pulled so far
        self.chars = 0  # characters pulled so far
        self.saw_text = False  # some line was not blank (a comment counts)
        self.record_start = 0  # 1-based line number where the current record starts
        self.records_seen = 0  # incremented by the consumer after each record
        self._records_at_pull = -1

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        at_start = self._records_at_pull != self.records_seen
        self._records_at_pull = self.records_seen
        for line in self._lines:
            self.line_no += 1
            self.chars += len(line)
            if not at_start:
                return line
            stripped = line.strip()
            if stripped:
                self.saw_text = True
                if not stripped.startswith("#"):
                    self.record_start = self.line_no
                    return line
        raise StopIteration


def _records(path: str, feed: _Lines) -> Iterator[tuple[int, list[str]]]:
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


def csv_records(path: str, lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each CSV record, comment and blank lines between records left out."""
    return _records(path, _Lines(lines))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_time(source: str, line_no: int, name: str, text: str, scale: int = 0) -> float:
    """A time field in seconds; ``scale`` -3 reads milliseconds (the artifact's ``arrival_ms``).

    Milliseconds are converted by moving the decimal point, so ``304.706`` ms becomes exactly the float
    nearest 0.304706 s (a division by 1000 would give 0.30470600000000003). Times are finite, >= 0 and
    at most :data:`diffsim.limits.MAX_ARRIVAL_S` seconds. (Errors name ``source`` and ``line_no``; the text
    is made only then, as this runs once per record.)
    """
    try:
        value = float(text)
    except ValueError:
        where = f"{source}: line {line_no}"
        raise InputError(f"{where}: {name} {text.strip()!r} is not a number") from None
    if value >= 0 and value <= MAX_ARRIVAL_S and not scale:
        return value  # the common case, checked at once (NaN fails both comparisons)
    where = f"{source}: line {line_no}"
    if not math.isfinite(value):
        raise InputError(f"{where}: {name} {text.strip()!r} is not a finite number")
    if value < 0:
        raise InputError(f"{where}: {name} {text.strip()} is negative")
    if scale:
        value = float(Decimal(text.strip().replace("_", "")).scaleb(scale))
    if value > MAX_ARRIVAL_S:
        raise InputError(f"{where}: {name} {text.strip()} is beyond {MAX_ARRIVAL_S:,.0f} s, the longest a trace may last")
    return value


def _parse_count(source: str, line_no: int, name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{source}: line {line_no}: {name} {text.strip()!r} is not an integer") from None
    if 0 <= value < 2**63:
        return value
    where = f"{source}: line {line_no}"
    if value < 0:
        raise InputError(f"{where}: {name} {value} is negative")
    raise InputError(f"{where}: {name} {value} is too large (at most 2**63-1)")


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


def _chunks_of(lines: Iterable[str], source: str, chunk_rows: int) -> Iterator[TraceChunk]:
    """The records of a trace's text (see the module docstring), ``chunk_rows`` at a time, in file order."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    lines = iter(lines)
    first = next(lines, None)
    marker = first.strip() if first is not None else ""
    has_marker = marker.startswith("# diffsim-trace")
    if has_marker and marker != DIFFSIM_MARKER:
        raise InputError(
            f"{source}: line 1: unsupported format marker {marker!r}; this diffsim reads {DIFFSIM_MARKER!r}"
        )
    feed = _Lines(itertools.chain(() if first is None else (first,), lines))

    columns: Optional[list[str]] = None  # None: artifact format
    prompt_at = seed_at = None  # field positions of the optional columns
    arrival: list[float] = []
    ids: list[int] = []
    prompts: list[str] = []
    seeds: list[int] = []
    requests = 0

    def chunk() -> TraceChunk:
        return TraceChunk(
            arrival_s=np.array(arrival, dtype=np.float64),
            prompt_id=np.array(ids, dtype=np.int64),
            prompt=list(prompts) if prompt_at is not None else None,
            seed=np.array(seeds, dtype=np.int64) if seed_at is not None else None,
            chars_read=feed.chars,
        )

    first_record = True
    for line_no, row in _records(source, feed):
        if first_record:
            first_record = False
            where = f"{source}: line {line_no}"
            if not any(_is_number(field) for field in row):
                columns = _header(where, row)
                prompt_at = columns.index("prompt") if "prompt" in columns else None
                seed_at = columns.index("seed") if "seed" in columns else None
                continue
            if has_marker:
                raise InputError(
                    f"{where}: expected the header line (e.g. arrival_s,prompt_id,prompt) after {DIFFSIM_MARKER!r}"
                )
        if columns is None:
            if len(row) != 2:
                raise InputError(f"{source}: line {line_no}: expected 2 fields arrival_ms,prompt_id, found {len(row)}")
            arrival.append(_parse_time(source, line_no, "arrival_ms", row[0], scale=-3))
            ids.append(_parse_count(source, line_no, "prompt_id", row[1]))
        else:
            if len(row) != len(columns):
                raise InputError(f"{source}: line {line_no}: expected {len(columns)} fields "
                                 f"({','.join(columns)}), found {len(row)}")
            arrival.append(_parse_time(source, line_no, "arrival_s", row[0]))
            ids.append(_parse_count(source, line_no, "prompt_id", row[1]))
            if prompt_at is not None:
                prompts.append(row[prompt_at])
            if seed_at is not None:
                seeds.append(_parse_count(source, line_no, "seed", row[seed_at]))
        if len(arrival) == chunk_rows:
            requests += len(arrival)
            yield chunk()
            arrival, ids, prompts, seeds = [], [], [], []

    if arrival:
        requests += len(arrival)
        yield chunk()
    if not requests:
        if columns is not None:
            what = "no requests after the header"
        else:
            what = "no requests (only comments and blank lines)" if feed.saw_text else "no requests (the file is empty)"
        raise InputError(f"{source}: line {max(1, feed.line_no)}: {what}")


def trace_chunks(path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[TraceChunk]:
    """The records of a trace file in either format, at most ``chunk_rows`` at a time, in file order.

    The file is read as the chunks are consumed: memory holds one chunk, whatever the file's length.
    Every problem is an :class:`~diffsim.errors.InputError` naming the file and the line; it is raised
    when the reader reaches it (a file with no requests: after its last line).
    """
    yield from _chunks_of(text_lines(path, "trace file"), str(path), chunk_rows)


def _whole(chunks: Iterable[TraceChunk], source: str) -> Trace:
    parts = list(chunks)
    has_prompt, has_seed = parts[0].prompt is not None, parts[0].seed is not None
    return sorted_trace(
        np.concatenate([c.arrival_s for c in parts]),
        np.concatenate([c.prompt_id for c in parts]),
        prompt=[p for c in parts for p in c.prompt] if has_prompt else None,
        seed=np.concatenate([c.seed for c in parts]) if has_seed else None,
        source=source,
    )


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """Parse the text of a trace file in either format (see the module docstring)."""
    lines = io.StringIO(text, newline="")  # splits at \n, \r\n or \r only, as CSV does
    return _whole(_chunks_of(lines, source, DEFAULT_CHUNK_ROWS), source)


def read_trace(path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Trace:
    """Read a whole trace file in the artifact format or the project's own (detected from its first lines)."""
    return _whole(trace_chunks(path, chunk_rows), str(path))


class TraceStats:
    """What ``diffsim trace info`` reports, accumulated chunk by chunk (rows in any order).

    Memory: the prompt ids seen (one int64 per distinct id) and one counter per window of each size in
    ``windows_s`` -- never one entry per request.
    """

    def __init__(self, windows_s: Sequence[float] = (1.0, 10.0)):
        self.requests = 0
        self.last_arrival_s = 0.0
        self.has_prompts = False
        self.has_seeds = False
        self.prompt_id_min: Optional[int] = None
        self.prompt_id_max: Optional[int] = None
        self.windows = {float(w): WindowCounts(w) for w in windows_s}
        self._distinct = np.zeros(0, dtype=np.int64)  # sorted distinct prompt ids seen ...
        self._pending: list[np.ndarray] = []  # ... but for these, merged once they outgrow it
        self._pending_size = 0

    def add(self, chunk: TraceChunk) -> None:
        if not len(chunk):
            return
        if not self.requests:
            self.has_prompts, self.has_seeds = chunk.prompt is not None, chunk.seed is not None
        self.requests += len(chunk)
        self.last_arrival_s = max(self.last_arrival_s, float(chunk.arrival_s.max()))
        lo, hi = int(chunk.prompt_id.min()), int(chunk.prompt_id.max())
        self.prompt_id_min = lo if self.prompt_id_min is None else min(self.prompt_id_min, lo)
        self.prompt_id_max = hi if self.prompt_id_max is None else max(self.prompt_id_max, hi)
        distinct = np.unique(chunk.prompt_id)
        self._pending.append(distinct)
        self._pending_size += len(distinct)
        if self._pending_size > len(self._distinct):  # amortised: each merge at least doubles the work saved
            self._merge()
        for counter in self.windows.values():
            counter.add(chunk.arrival_s)

    def _merge(self) -> None:
        self._distinct = np.unique(np.concatenate([self._distinct, *self._pending]))
        self._pending, self._pending_size = [], 0

    @property
    def distinct_prompt_ids(self) -> int:
        self._merge()
        return len(self._distinct)

    @property
    def duration_s(self) -> float:
        """Time of the last arrival (traces start at 0)."""
        return self.last_arrival_s

    @property
    def mean_rate_qps(self) -> float:
        return self.requests / self.last_arrival_s if self.last_arrival_s > 0 else 0.0


# ----------------------------------------------------------------------------------------------- writing


def _check_writable(fmt: str, has_extra: bool, drop_extra: bool) -> None:
    if fmt not in FORMATS:
        raise DiffsimError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "artifact" and has_extra and not drop_extra:
        raise DiffsimError(
            "the artifact format cannot hold prompt texts or seeds; "
            "leave them out explicitly (diffsim trace convert --drop-prompts)"
        )


def _header_text(fmt: str, has_prompt: bool, has_seed: bool) -> str:
    if fmt == "artifact":
        return ""
    columns = ["arrival_s", "prompt_id"] + ["prompt"] * has_prompt + ["seed"] * has_seed
    return DIFFSIM_MARKER + "\n" + ",".join(columns) + "\n"


def _rows_text(fmt: str, arrival_s: np.ndarray, prompt_id: np.ndarray, prompt: Optional[Sequence[str]],
               seed: Optional[np.ndarray]) -> str:
    """The records' lines; the artifact format leaves prompts and seeds out (checked by the caller)."""
    arrivals, ids = arrival_s.tolist(), prompt_id.tolist()
    if fmt == "artifact":
        return "".join(f"{t * 1000.0:.3f},{pid}\n" for t, pid in zip(arrivals, ids))
    seeds = seed.tolist() if seed is not None else None
    out = []
    for i in range(len(arrivals)):
        row = [repr(float(arrivals[i])), str(ids[i])]
        if prompt is not None:
            row.append(_quoted(prompt[i]))
        if seeds is not None:
            row.append(str(seeds[i]))
        out.append(",".join(row) + "\n")
    return "".join(out)


def _quoted(text: str) -> str:
    """A prompt as one CSV field, always quoted: safe for commas, quotes and any line break."""
    return '"' + text.replace('"', '""') + '"'


def _trace_rows(trace: Trace, fmt: str, chunk_rows: int) -> Iterator[str]:
    for start in range(0, len(trace), chunk_rows):
        stop = start + chunk_rows
        yield _rows_text(fmt, trace.arrival_s[start:stop], trace.prompt_id[start:stop],
                         None if trace.prompt is None else trace.prompt[start:stop],
                         None if trace.seed is None else trace.seed[start:stop])


def format_trace(trace: Trace, fmt: str = "diffsim", *, drop_extra: bool = False) -> str:
    """The text of a trace file. The artifact format has no prompt texts or seeds: dropping them must be
    asked for (``drop_extra``); its times are written in milliseconds to the microsecond."""
    _check_writable(fmt, trace.prompt is not None or trace.seed is not None, drop_extra)
    if not len(trace):
        raise DiffsimError("refusing to write an empty trace (it has no requests)")
    return _header_text(fmt, trace.prompt is not None, trace.seed is not None) + "".join(
        _trace_rows(trace, fmt, max(1, len(trace))))


@contextmanager
def _output(path: Path):
    """A text file written as ``PATH.part`` and renamed to ``path`` once complete (removed on failure), so
    a failed write never leaves a partial trace, and the input may be the output."""
    part = path.with_name(path.name + ".part")
    try:
        f = open(part, "w", encoding="utf-8", newline="")
    except OSError as e:
        raise DiffsimError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with f:
            yield f
        os.replace(part, path)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DiffsimError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def write_trace(trace: Trace, path, fmt: str = "diffsim", *, drop_extra: bool = False,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """Write ``trace`` to ``path`` in the project's format (exact round trip) or the artifact's; the text
    is made ``chunk_rows`` records at a time."""
    _check_writable(fmt, trace.prompt is not None or trace.seed is not None, drop_extra)
    if not len(trace):
        raise DiffsimError("refusing to write an empty trace (it has no requests)")
    with _output(Path(path)) as f:
        f.write(_header_text(fmt, trace.prompt is not None, trace.seed is not None))
        for text in _trace_rows(trace, fmt, chunk_rows):
            f.write(text)


# -------------------------------------------------------------------------------------------- converting

Progress = Callable[[str, int, int], None]  # (stage, done, total): chars of the file read, or rows merged


class _OutOfOrder(Exception):
    """The input is not sorted by arrival time: a streaming conversion cannot write it as it reads it."""


def convert_trace(src, dst, fmt: str = "diffsim", *, drop_extra: bool = False,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: Optional[Progress] = None) -> int:
    """Rewrite the trace file ``src`` as ``dst`` in ``fmt``, sorted by arrival (stably), holding about
    ``chunk_rows`` records in memory whatever the file's length; returns the number of requests.

    A sorted file (every trace diffsim writes) is converted in one pass, each chunk written as it is read.
    Where a record arrives before one above it, the conversion starts again as an external merge sort:
    each chunk is sorted and written as binary arrays to a temporary directory beside ``dst`` (a
    :class:`_Run`), then the runs are merged (:func:`_merged_chunks`), earlier runs first among equal
    times -- the order :func:`read_trace` gives. ``dst`` appears only once complete.
    """
    _check_writable(fmt, False, drop_extra)
    dst = Path(dst)
    size = file_size(src)
    with _output(dst) as out:
        try:
            return _write_chunks(out, trace_chunks(src, chunk_rows), fmt, drop_extra, in_order=True,
                                 on_read=_reporter(progress, "read", size))
        except _OutOfOrder:
            out.seek(0)
            out.truncate()
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.sort-", dir=dst.parent) as runs_dir:
            runs = _sorted_runs(src, chunk_rows, Path(runs_dir), _reporter(progress, "sort", size))
            merged = _merged_chunks(runs, chunk_rows)
            return _write_chunks(out, merged, fmt, drop_extra, in_order=False,
                                 on_read=_reporter(progress, "merge", sum(run.n for run in runs), by_rows=True))


def file_size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # the reader says what is wrong


def _reporter(progress: Optional[Progress], stage: str, total: int, *,
              by_rows: bool = False) -> Optional[Callable[[TraceChunk, int], None]]:
    """``report(chunk, rows so far)`` for :func:`_write_chunks` and :func:`_sorted_runs`: the stage's
    progress in characters of the file read, or (``by_rows``) in records."""
    if progress is None:
        return None
    return lambda chunk, rows: progress(stage, rows if by_rows else chunk.chars_read, total)


def _write_chunks(out, chunks: Iterable[TraceChunk], fmt: str, drop_extra: bool, *, in_order: bool,
                  on_read: Optional[Callable[[TraceChunk, int], None]]) -> int:
    written = 0
    last = -math.inf
    with closing(iter(chunks)) as it:
        for chunk in it:
            if not written:
                _check_writable(fmt, chunk.prompt is not None or chunk.seed is not None, drop_extra)
                out.write(_header_text(fmt, chunk.prompt is not None, chunk.seed is not None))
            if in_order and (chunk.arrival_s[0] < last or not chunk.in_order()):
                raise _OutOfOrder
            last = float(chunk.arrival_s[-1])
            out.write(_rows_text(fmt, chunk.arrival_s, chunk.prompt_id, chunk.prompt, chunk.seed))
            written += len(chunk)
            if on_read is not None:
                on_read(chunk, written)
    return written


class _Run:
    """One sorted chunk of an external sort, as binary files (read back without parsing): arrival times
    (float64), prompt ids and seeds (int64), and prompt texts as UTF-8 bytes with their offsets. Any
    window of it can be read; nothing of it is held in memory."""

    def __init__(self, directory: Path, index: int, trace: Trace):
        self.prefix = directory / f"run{index:06d}"
        self.n = len(trace)
        self.has_prompt, self.has_seed = trace.prompt is not None, trace.seed is not None
        trace.arrival_s.tofile(self._path("arrival_s"))
        trace.prompt_id.tofile(self._path("prompt_id"))
        if self.has_seed:
            trace.seed.tofile(self._path("seed"))
        if self.has_prompt:
            encoded = [p.encode("utf-8") for p in trace.prompt]
            offsets = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
            offsets.tofile(self._path("prompt_offsets"))
            self._path("prompt").write_bytes(b"".join(encoded))

    def _path(self, column: str) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.{column}")

    def read(self, start: int, stop: int) -> TraceChunk:
        """Records ``start`` to ``stop`` (exclusive) of the run."""
        count = stop - start

        def column(name: str, dtype) -> np.ndarray:
            return np.fromfile(self._path(name), dtype=dtype, count=count, offset=start * 8)

        prompt = None
        if self.has_prompt:
            offsets = np.fromfile(self._path("prompt_offsets"), dtype=np.int64, count=count + 1, offset=start * 8)
            with open(self._path("prompt"), "rb") as f:
                f.seek(int(offsets[0]))
                blob = f.read(int(offsets[-1] - offsets[0]))
            edges = (offsets - offsets[0]).tolist()
            prompt = [blob[a:b].decode("utf-8") for a, b in zip(edges[:-1], edges[1:])]
        return TraceChunk(column("arrival_s", np.float64), column("prompt_id", np.int64), prompt,
                          column("seed", np.int64) if self.has_seed else None)


def _sorted_runs(src, chunk_rows: int, runs_dir: Path, on_read) -> list[_Run]:
    """Each chunk of ``src``, sorted (stably), written as a :class:`_Run`."""
    runs = []
    with closing(trace_chunks(src, chunk_rows)) as chunks:
        for chunk in chunks:
            runs.append(_Run(runs_dir, len(runs), chunk.sorted()))
            if on_read is not None:
                on_read(chunk, sum(run.n for run in runs))
    return runs


def _merged_chunks(runs: list[_Run], chunk_rows: int) -> Iterator[TraceChunk]:
    """The records of the sorted ``runs`` in one sorted sequence -- by arrival time, then run, then place
    in the run: a stable sort of the file -- with about ``chunk_rows`` records in memory.

    Each run has a window of its next records in memory. A record not yet read sorts after every record
    of its run's window, so every windowed record up to the smallest window-end among the runs with
    records left on disk can go out now (at least that run's whole window); windows emptied are refilled.
    """
    window = max(1, chunk_rows // len(runs))
    read = [0] * len(runs)  # records of each run read so far
    windows: list[Optional[TraceChunk]] = [None] * len(runs)
    while True:
        for r, run in enumerate(runs):
            if (windows[r] is None or not len(windows[r])) and read[r] < run.n:
                windows[r] = run.read(read[r], min(run.n, read[r] + window))
                read[r] += len(windows[r])
        live = [r for r in range(len(runs)) if windows[r] is not None and len(windows[r])]
        if not live:
            return
        on_disk = [r for r in live if read[r] < runs[r].n]
        takes = {r: len(windows[r]) for r in live}
        if on_disk:
            limit_run = min(on_disk, key=lambda r: (float(windows[r].arrival_s[-1]), r))
            limit = float(windows[limit_run].arrival_s[-1])
            for r in live:  # up to (limit, limit_run) in (arrival, run) order
                takes[r] = int(np.searchsorted(windows[r].arrival_s, limit, side="right" if r <= limit_run else "left"))
        parts = [(r, takes[r]) for r in live if takes[r]]
        arrival = np.concatenate([windows[r].arrival_s[:k] for r, k in parts])
        run_of = np.concatenate([np.full(k, r) for r, k in parts])
        place = np.concatenate([np.arange(k) for _, k in parts])
        order = np.lexsort((place, run_of, arrival))
        first = windows[live[0]]
        prompt = [p for r, k in parts for p in windows[r].prompt[:k]] if first.prompt is not None else None
        yield TraceChunk(
            arrival_s=arrival[order],
            prompt_id=np.concatenate([windows[r].prompt_id[:k] for r, k in parts])[order],
            prompt=None if prompt is None else [prompt[i] for i in order],
            seed=None if first.seed is None else np.concatenate([windows[r].seed[:k] for r, k in parts])[order],
        )
        for r, k in parts:
            w = windows[r]
            windows[r] = TraceChunk(w.arrival_s[k:], w.prompt_id[k:], None if w.prompt is None else w.prompt[k:],
                                    None if w.seed is None else w.seed[k:])


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DIFFSIM_MARKER",
    "FORMATS",
    "Trace",
    "TraceChunk",
    "TraceStats",
    "WindowCounts",
    "convert_trace",
    "csv_records",
    "format_trace",
    "parse_trace",
    "read_trace",
    "sorted_trace",
    "trace_chunks",
    "window_counts",
    "write_trace",
]
