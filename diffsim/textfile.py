"""Reading the text files users give diffsim (traces, rate curves, YAML files), with one-line errors.

A file that is missing, a directory, unreadable, or not UTF-8 text (a binary file given by mistake) is
one :class:`~diffsim.errors.InputError` line naming the file -- and, for bytes that are not UTF-8, the
line where the text stops. A UTF-8 byte-order mark is allowed and dropped.

:func:`read_text` returns the whole text; :func:`text_lines` yields it line by line, so a reader of a
large file (a trace of millions of requests) holds one line at a time. Lines end at ``\\n``, ``\\r\\n``
or ``\\r``, as :mod:`csv` expects (the file is opened with ``newline=""``), and keep their line break.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterator

from .errors import InputError

ENCODING = "utf-8-sig"


def read_text(path: Path | str, what: str = "file") -> str:
    """The file's whole text; ``what`` names the kind of file in the errors ("trace file", ...)."""
    return "".join(text_lines(path, what))


def text_lines(path: Path | str, what: str = "file") -> Iterator[str]:
    """The file's lines, read as they are consumed (see the module docstring)."""
    path = Path(path)
    try:
        f = open(path, encoding=ENCODING, newline="")
    except FileNotFoundError:
        raise InputError(f"{path}: cannot read: no such {what}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: cannot read: is a directory, not a {what}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            yield from f
        except UnicodeDecodeError:
            # The text layer decodes blocks, not lines: find the line of the first bad byte.
            raise InputError(f"{path}: line {_first_undecodable_line(path)}: not UTF-8 text "
                             "(is it a binary file?)") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


def _first_undecodable_line(path: Path) -> int:
    """The 1-based line (counted at ``\\n``) of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 16)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                # e.start counts from the bytes the decoder held back from the last block (at most 3, none
                # of them a line break), so the line count of the block's prefix is exact.
                pending = len(e.object) - len(block)
                return line + block[: max(0, e.start - pending)].count(b"\n")
            if not block:
                return line
            line += block.count(b"\n")
