"""Where the shipped profiles and traces live.

In a source checkout (and an editable install) they are the top-level ``profiles/`` and ``traces/``
folders beside the package. A regular install copies them to ``<prefix>/share/diffsim/``.
``DIFFSIM_HOME`` overrides both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import DiffsimError


def data_root() -> Path:
    env = os.environ.get("DIFFSIM_HOME")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "profiles").is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "diffsim"


def profiles_dir() -> Path:
    return data_root() / "profiles"


def traces_dir() -> Path:
    return data_root() / "traces"


def resolve_profile(name_or_path: str) -> Path:
    """A GPU name such as ``a100`` names ``profiles/a100.yaml``; anything else is a path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise DiffsimError(f"{path}: no such profile file")
        return path
    shipped = profiles_dir() / f"{name_or_path}.yaml"
    if not shipped.exists():
        known = sorted(p.stem for p in profiles_dir().glob("*.yaml") if p.stem != "cascades")
        raise DiffsimError(f"unknown GPU profile {name_or_path!r}: give a YAML path or one of {', '.join(known)}")
    return shipped


def resolve_trace(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = traces_dir() / name_or_path
    if shipped.exists():
        return shipped
    raise DiffsimError(f"{name_or_path}: no such trace file")
