"""diffsim.textfile: the one reader of users' text files (traces, rate curves, prompts, YAML files)."""

from __future__ import annotations

import pytest

from diffsim.errors import InputError
from diffsim.textfile import read_text, text_lines


def test_lines_keep_their_breaks_and_lose_the_byte_order_mark(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffa,1\r\nb,2\rc,é\n".encode())
    assert list(text_lines(path)) == ["a,1\r\n", "b,2\r", "c,é\n"]
    assert read_text(path) == "a,1\r\nb,2\rc,é\n"


def test_the_line_of_the_first_byte_that_is_not_utf8(tmp_path):
    # far past the first block the reader decodes, with 2-byte characters across every block boundary
    line = "é" * 41 + "\n"  # 83 bytes: block boundaries fall inside characters
    path = tmp_path / "big.csv"
    path.write_bytes((line * 5000).encode() + b"\xff\n" + line.encode())
    with pytest.raises(InputError) as err:
        list(text_lines(path, "trace file"))
    assert str(err.value) == f"{path}: line 5001: not UTF-8 text (is it a binary file?)"
    good = tmp_path / "good.csv"
    good.write_bytes((line * 5000).encode())
    assert sum(1 for _ in text_lines(good)) == 5000
    # a 4-byte character whose last byte opens the second block, then the bad byte and a line break
    edge = tmp_path / "edge.csv"
    head = b"x" * 9 + b"\n"
    edge.write_bytes(head * 6553 + b"abc" + "\U0001F600".encode() + b"\xff\nnext\n")
    assert len(head * 6553 + b"abc") == 65533
    with pytest.raises(InputError, match="line 6554: not UTF-8"):
        read_text(edge)
    cut = tmp_path / "cut.csv"
    cut.write_bytes(b"ok\n" + "é".encode()[:1])  # a character cut short by the end of the file
    with pytest.raises(InputError, match="line 2: not UTF-8"):
        read_text(cut)


def test_missing_files_and_directories_name_what_was_expected(tmp_path):
    with pytest.raises(InputError, match=r"nope.csv: cannot read: no such trace file$"):
        read_text(tmp_path / "nope.csv", "trace file")
    with pytest.raises(InputError, match=r"cannot read: is a directory, not a rate file$"):
        list(text_lines(tmp_path, "rate file"))
