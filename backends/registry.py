"""Build an executor from plain data: a backend name, a model name and options.

:class:`ExecutorConfig` is everything needed to rebuild an executor elsewhere (another process or
machine): strings, numbers and paths only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from diffsim.errors import DiffsimError

from .base import Executor
from .specs import MODEL_NAMES

BACKENDS = ("cuda", "cpu-tiny")


@dataclass(frozen=True)
class ExecutorConfig:
    backend: str
    model: str
    weights: str = "random"
    device_index: int = 0  # cuda only
    discriminator: bool = True
    discriminator_weights: Optional[str] = None
    discriminator_arch: Optional[str] = None
    discriminator_image_size: Optional[int] = None
    compile_unet: bool = False  # cuda only
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_backend_and_model(backend: str, model: str) -> None:
    if backend not in BACKENDS:
        raise DiffsimError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if model not in MODEL_NAMES:
        raise DiffsimError(f"unknown model {model!r} (known: {', '.join(MODEL_NAMES)})")


def make_executor(
    backend: str,
    model: str,
    *,
    weights: str | Path = "random",
    device: int | str = 0,
    discriminator: bool = True,
    discriminator_weights: str | Path | None = None,
    discriminator_arch: str | None = None,
    discriminator_image_size: int | None = None,
    compile_unet: bool = False,
    seed: int = 0,
) -> Executor:
    """An executor (not yet loaded: call ``load()`` or use it as a context manager).

    ``device``: the CUDA device index (``3`` or ``"cuda:3"``) for ``cuda``; ignored by ``cpu-tiny``.
    """
    check_backend_and_model(backend, model)
    common = dict(
        weights=weights,
        discriminator=discriminator,
        discriminator_weights=discriminator_weights,
        discriminator_arch=discriminator_arch,
        discriminator_image_size=discriminator_image_size,
        seed=seed,
    )
    if backend == "cpu-tiny":
        if compile_unet:
            raise DiffsimError("backend cpu-tiny: --compile is only for the cuda backend")
        from .cpu_tiny import CpuTinyExecutor

        return CpuTinyExecutor(model, **common)
    from .cuda import CudaExecutor

    return CudaExecutor(model, device_index=_device_index(device), compile_unet=compile_unet, **common)


def executor_from_config(config: ExecutorConfig) -> Executor:
    return make_executor(
        config.backend,
        config.model,
        weights=config.weights,
        device=config.device_index,
        discriminator=config.discriminator,
        discriminator_weights=config.discriminator_weights,
        discriminator_arch=config.discriminator_arch,
        discriminator_image_size=config.discriminator_image_size,
        compile_unet=config.compile_unet,
        seed=config.seed,
    )


def _device_index(device: int | str) -> int:
    text = str(device)
    text = text.removeprefix("cuda:") if text.startswith("cuda:") else text
    if text == "cuda":
        return 0
    try:
        index = int(text)
    except ValueError:
        raise DiffsimError(f"bad CUDA device {device!r}: expected an index such as 0 or cuda:0") from None
    if index < 0:
        raise DiffsimError(f"bad CUDA device {device!r}: the index must be >= 0")
    return index
