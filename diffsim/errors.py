"""User-facing errors.

Every problem with user input (a trace, a profile, a config, a CLI flag) is raised as a
:class:`DiffsimError` whose message is one line that names the file and the field or line.
The CLI prints that line and exits non-zero; it never shows a traceback for these.
"""


class DiffsimError(Exception):
    """An error caused by the user's input, with a one-line message fit to print as is."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(DiffsimError):
    """Malformed input file (trace, profile, config, image folder, weights)."""
