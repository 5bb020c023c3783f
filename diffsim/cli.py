"""The ``diffsim`` command: a thin dispatcher over one module per sub-command in ``diffsim/commands``.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Modules are imported
lazily so that ``diffsim simulate`` and ``diffsim plan`` never import torch.
A :class:`~diffsim.errors.DiffsimError` is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DiffsimError

# sub-command name -> module in diffsim.commands
COMMANDS = {
    "plan": "plan",
    "simulate": "simulate",
    "compare": "compare",
    "trace": "trace",
    "serve": "serve",
    "load": "load",
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


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(mods[args.command].run(args) or 0)
    except DiffsimError as e:
        print(f"diffsim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
