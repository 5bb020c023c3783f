"""Per-prompt discriminator confidence without running a discriminator.

Two sources:

* **the cascade's deferral curve** (:meth:`Confidences.from_curve`): a prompt's confidence is drawn
  by inverse CDF, ``deferral.inverse(u)`` with ``u`` a stable hash of (prompt id, seed) in [0, 1).
  The fraction of prompts whose confidence is below t is then f(t) up to sampling, and a prompt has
  the same confidence every time it appears (as with a real discriminator, which scores the image of a
  prompt the same way each time);
* **a CSV file** ``prompt_id,confidence`` (:meth:`Confidences.from_csv`), e.g. written by
  ``diffsim calibrate`` from real discriminator scores. A header line is optional; ``#`` comments and
  blank lines are skipped; anything else malformed is an :class:`~diffsim.errors.InputError` naming the
  line. A prompt id that is not in the file is an error too (:meth:`Confidences.check_covers` says so
  before a run starts, naming the file and the id) -- a silent fallback would mix two sources.

:func:`stable_uniform` is also what the router uses for its per-query split decisions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

from ..errors import InputError
from ..profiles import DeferralCurve

_MASK = (1 << 64) - 1

# Streams keep independent draws apart for the same key and seed.
STREAM_CONFIDENCE = 1
STREAM_SPLIT = 2


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stable_uniform(key: int, seed: int, stream: int) -> float:
    """A number in [0, 1) that depends only on (key, seed, stream): the same on every run and platform."""
    x = _mix64(_mix64(_mix64(seed & _MASK) ^ (stream & _MASK)) ^ (key & _MASK))
    return (x >> 11) * (1.0 / (1 << 53))


class Confidences:
    """Confidence of the light image of each prompt id; ``of(prompt_id)`` is cached."""

    def __init__(self, *, curve: Optional[DeferralCurve] = None, seed: int = 0,
                 table: Optional[dict[int, float]] = None, source: str = ""):
        if (curve is None) == (table is None):
            raise ValueError("give exactly one of a deferral curve or a table")
        self.curve = curve
        self.seed = seed
        self.source = source
        self._table = table
        self._cache: dict[int, float] = dict(table) if table is not None else {}

    @classmethod
    def from_curve(cls, curve: DeferralCurve, seed: int) -> "Confidences":
        return cls(curve=curve, seed=seed, source="deferral curve")

    @classmethod
    def from_csv(cls, path: Path | str) -> "Confidences":
        return cls(table=read_confidences(path), source=str(path))

    def of(self, prompt_id: int) -> float:
        c = self._cache.get(prompt_id)
        if c is not None:
            return c
        if self._table is not None:
            raise InputError(f"{self.source}: no confidence for prompt id {prompt_id}")
        c = self.curve.inverse(stable_uniform(prompt_id, self.seed, STREAM_CONFIDENCE))
        self._cache[prompt_id] = c
        return c

    def learn(self, known: dict[int, float]) -> None:
        """Use these measured confidences for their prompts (e.g. what a real server reported); others
        still come from the curve or the table."""
        self._cache.update({int(p): float(c) for p, c in known.items()})

    def check_covers(self, prompt_ids: Iterable[int]) -> None:
        """Raise a one-line error naming the first prompt id the table lacks (no-op for the curve)."""
        if self._table is None:
            return
        for pid in sorted(set(int(p) for p in prompt_ids)):
            if pid not in self._table:
                raise InputError(f"{self.source}: no confidence for prompt id {pid}, which the trace uses")


def read_confidences(path: Path | str) -> dict[int, float]:
    """Parse a ``prompt_id,confidence`` CSV into {prompt id: confidence in [0, 1]}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    table: dict[int, float] = {}
    seen_record = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cells = [c.strip() for c in line.split(",")]
        if not seen_record and [c.lower() for c in cells] == ["prompt_id", "confidence"]:
            seen_record = True
            continue
        seen_record = True
        if len(cells) != 2:
            raise InputError(f"{path}: line {lineno}: expected 2 fields prompt_id,confidence, got {len(cells)}")
        try:
            pid = int(cells[0])
        except ValueError:
            raise InputError(f"{path}: line {lineno}: prompt_id {cells[0]!r} is not an integer") from None
        try:
            conf = float(cells[1])
        except ValueError:
            raise InputError(f"{path}: line {lineno}: confidence {cells[1]!r} is not a number") from None
        if not math.isfinite(conf) or not 0 <= conf <= 1:
            raise InputError(f"{path}: line {lineno}: confidence {cells[1]} is not in [0, 1]")
        if pid in table:
            raise InputError(f"{path}: line {lineno}: prompt id {pid} appears twice")
        table[pid] = conf
    if not table:
        raise InputError(f"{path}: no confidences in the file")
    return table
