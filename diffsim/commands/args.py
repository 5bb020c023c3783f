"""Argument types and checks the commands share, so that every flag is refused the same way.

Numbers use the bounds of :mod:`diffsim.limits` (``type=limits.GPUS``); the helpers here cover what a
bound alone cannot: a name or path that must not be empty, and comma-separated lists. A problem is one
line naming the flag (argparse's own error for a ``type=``, a :class:`~diffsim.errors.DiffsimError`
for a list checked in ``run``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..errors import DiffsimError
from ..limits import Range


def nonempty(text: str) -> str:
    """argparse ``type=`` for a name or a path: an empty string is refused rather than read as "here"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def bounded(help_text: str, bounds: Range, default: object = None) -> str:
    """A help line that states the accepted range (and the default, when there is one)."""
    tail = f"; default {default}" if default is not None else ""
    return f"{help_text} ({bounds}{tail})"


def number_list(text: str, flag: str, bounds: Range, *, count: Optional[int] = None,
                unique: bool = False, most: int = 1000) -> list:
    """The comma-separated numbers of ``text``, each inside ``bounds`` (blank items are skipped).

    At least one number (exactly ``count`` when given, at most ``most``); ``unique`` refuses repeats.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    kind = "integers" if bounds.integer else "numbers"
    if not items:
        raise DiffsimError(f"{flag}: expected comma-separated {kind}, got an empty list {text!r}")
    if count is not None and len(items) != count:
        raise DiffsimError(f"{flag}: expected {count} comma-separated {kind}, got {text!r}")
    if len(items) > most:
        raise DiffsimError(f"{flag}: at most {most} values, got {len(items)}")
    values = []
    for item in items:
        try:
            values.append(bounds.parse(item))
        except ValueError as e:
            raise DiffsimError(f"{flag}: each value {e}") from None
    if unique and len(set(values)) != len(values):
        raise DiffsimError(f"{flag}: {text!r} repeats a value")
    return values


def name_list(text: str, flag: str) -> list[str]:
    """The comma-separated names of ``text``; at least one, none repeated."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise DiffsimError(f"{flag}: give at least one value")
    if len(set(items)) != len(items):
        raise DiffsimError(f"{flag}: {text!r} repeats a value")
    return items


def nonempty_path(text: str) -> Path:
    """argparse ``type=`` for a file or folder: a Path, never the empty string (which would mean ".")."""
    return Path(nonempty(text))
