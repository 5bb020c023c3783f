"""The ``diffsim`` command: a thin dispatcher over one module per sub-command in ``diffsim/commands``.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Modules are imported
lazily so that ``diffsim simulate`` and ``diffsim plan`` never import torch.

One error path for every command: a :class:`~diffsim.errors.DiffsimError` (bad file, bad value), a
command line argparse refuses, and an optional dependency that is not installed are each printed as one
line on stderr, ``diffsim COMMAND: error: ...``, with exit code 2. No usage block, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from .errors import DiffsimError, UsageError, missing_dependency_message

# sub-command name -> module in diffsim.commands
COMMANDS = {
    "plan": "plan",
    "simulate": "simulate",
    "compare": "compare",
    "trace": "trace",
    "serve": "serve",
    "load": "load",
    "validate": "validate",
    "profile": "profile",
    "discriminator": "discriminator",
    "quality": "quality",
    "calibrate": "calibrate",
}


def _available() -> dict:
    mods = {}
    for name, module in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(f"diffsim.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"diffsim.commands.{module}":
                continue  # not built yet
            raise
    return mods


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as :class:`UsageError`, printed by :func:`main`).

    A value that starts with a minus sign and a digit (``-1,0``, ``-1e-3``, ``-inf``) is taken as a value,
    not as an unknown option: no diffsim option starts with a digit, and the bounds then say what is
    wrong with the number, where argparse alone would say "expected one argument".
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str):
        raise UsageError(self.prog, re.sub(r"^argument ", "", message))


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = Parser(
        prog="diffsim",
        description="Query-aware model scaling for diffusion cascades: plan, simulate, serve.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _available()
    for name, mod in mods.items():
        mod.add_parser(sub)
    return parser, mods


def main(argv: list[str] | None = None) -> int:
    parser, mods = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(mods[args.command].run(args) or 0)
    except DiffsimError as e:
        print(f"diffsim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        message = missing_dependency_message(e.name)
        if message is None:
            raise
        print(f"diffsim {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
