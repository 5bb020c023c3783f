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
from .textfile import read_text


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
