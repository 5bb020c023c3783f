"""Reading the YAML files users give diffsim (config files, GPU profiles, cascades files), strictly.

PyYAML's ``safe_load`` lets a repeated key silently replace the first one; here it is an error naming
the key and both lines. A file that is not UTF-8 text (a binary file given by mistake) is an error
naming the file and the line where it stops being text. Every problem is one
:class:`~diffsim.errors.InputError` line that names the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import InputError


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def read_text(path: Path | str) -> str:
    """The file's text (UTF-8, a byte-order mark allowed); one-line errors naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: cannot read: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: cannot read: is a directory, not a file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (is it a binary file?)") from None


def parse_yaml(text: str, source: Path | str) -> object:
    """The YAML document in ``text``; a syntax error or a duplicate key names ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise InputError(f"{source}: {where}{problem}") from None
    except RecursionError:
        raise InputError(f"{source}: nested too deeply to be a diffsim file") from None


def read_yaml(path: Path | str) -> object:
    """Read and parse a YAML file strictly (see the module docstring)."""
    return parse_yaml(read_text(path), path)
