"""Progress bars for the steps that can take more than a few seconds (trace info on a large file, a trace
conversion, ``diffsim load``, serve's start-up, ``diffsim calibrate``).

A bar goes to stderr, and only when stderr is a terminal: stdout carries the results alone, and a log
file or a pipe gets none of a bar's control characters. The decision is :func:`progress_enabled`; the
bars themselves are tqdm's, made by :func:`progress_bar` (disabled bars draw nothing and cost little).
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO


def progress_enabled(stream: Optional[TextIO] = None) -> bool:
    """Whether to draw progress on ``stream`` (default: stderr): only when it is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*, stream: Optional[TextIO] = None, enabled: Optional[bool] = None, **kwargs):
    """A tqdm bar on ``stream`` (default: stderr), drawn only where :func:`progress_enabled` says so
    (``enabled`` overrides it: a ``--no-progress`` flag). Bars leave no line behind unless asked to."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    show = progress_enabled(stream) if enabled is None else enabled and progress_enabled(stream)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=stream, disable=not show, **kwargs)
