"""Every ``diffsim ...`` command line in README.md's code blocks parses against the CLI as it is.

Parse only: nothing runs. A flag renamed or removed, a value out of its bounds or a sub-command that does
not exist makes the README wrong, and this test says which line. The YAML config example parses too.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from diffsim.cli import build_parser
from diffsim.errors import UsageError

README = Path(__file__).resolve().parent.parent / "README.md"
OPERATORS = {"&&", "||", "|", ";", "&"}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def diffsim_commands(block: str) -> list[list[str]]:
    """The argument lists of the ``diffsim`` commands in a shell block (continued lines joined, comments
    dropped, one list per command of a ``&&`` / ``|`` / ``;`` chain)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if "diffsim" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as e:  # unbalanced quotes: report the line as a command that cannot parse
            commands.append([f"<unreadable line: {e}: {line.strip()}>"])
            continue
        starts = [i for i, t in enumerate(tokens) if t == "diffsim" and (i == 0 or tokens[i - 1] in OPERATORS)]
        for i in starts:
            end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in OPERATORS), len(tokens))
            commands.append(tokens[i + 1:end])
    return commands


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    return [argv for lang, body in code_blocks(text) if lang in ("sh", "bash") for argv in diffsim_commands(body)]


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    assert len(COMMANDS) >= 20
    assert {argv[0] for argv in COMMANDS if argv} >= {"plan", "simulate", "compare", "serve", "load"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_parses(argv):
    parser, _ = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        pytest.fail(f"README.md: diffsim {' '.join(argv)}\n  -> {e.prog}: {e}")
    assert args.command == argv[0]


def test_readme_config_example_is_a_valid_config(tmp_path):
    from diffsim.config import build_sim_config, read_config_file

    examples = [body for lang, body in code_blocks(README.read_text(encoding="utf-8")) if lang == "yaml"]
    assert examples, "README.md has no YAML config example"
    for i, body in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(body)
        build_sim_config(read_config_file(path))
