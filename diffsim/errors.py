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


class SettingError(InputError):
    """A run setting out of bounds or inconsistent with another, before the command knows where it came
    from (a flag or a config file). ``field`` is the setting's name (``gpus``, ``controller.tick_s``);
    the message reads ``config: FIELD: PROBLEM`` until the command names the source."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = " ".join(str(problem).split())
        super().__init__(f"config: {field}: {self.problem}")


class UsageError(DiffsimError):
    """A command line argparse refused; ``prog`` is the (sub-)command, e.g. ``diffsim simulate``."""

    def __init__(self, prog: str, message: str):
        self.prog = prog
        super().__init__(message)


# Optional dependencies: the module a command imports -> (the package to install, the setup.cfg extra).
OPTIONAL_MODULES = {
    "torch": ("torch", "cuda"),
    "torchvision": ("torchvision", "cuda"),
    "diffusers": ("diffusers", "cuda"),
    "transformers": ("transformers", "cuda"),
    "timm": ("timm", "cuda"),
    "safetensors": ("safetensors", "cuda"),
    "torchmetrics": ("torchmetrics", "cuda"),
    "PIL": ("pillow", "cuda"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "httpx": ("httpx", "serve"),
    "aiohttp": ("aiohttp", "serve"),
    "prometheus_client": ("prometheus-client", "serve"),
    "ray": ("ray", "ray"),
}


def missing_dependency_message(module: str | None) -> str | None:
    """One line saying which extra installs ``module`` (a name from ModuleNotFoundError), or None when
    it is not one of diffsim's optional dependencies."""
    if not module:
        return None
    top = module.split(".")[0]
    if top not in OPTIONAL_MODULES:
        return None
    package, extra = OPTIONAL_MODULES[top]
    torch_first = " (install torch first, as the README says)" if extra == "cuda" else ""
    return (f"needs {package}, which is not installed (the core install has no {extra} extra): "
            f"pip install -e '.[{extra}]'{torch_first}")
