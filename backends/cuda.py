"""The ``cuda`` backend: a full-size model in fp16 on one CUDA device (one device index per worker).

Imports without a GPU; constructing it without CUDA raises a DiffsimError. ``compile_unet=True`` wraps the
UNet in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): opt-in and off by default, because its
benefit and its compile time could not be measured where this was written (no GPU there). The H100
reference shows why it may matter: at small batch, eager diffusers is bound by the host's kernel launches.
"""

from __future__ import annotations

from pathlib import Path

from diffsim.errors import DiffsimError

from .base import PipelineExecutor
from .specs import get_spec


def cuda_device(index: int) -> str:
    """``cuda:<index>`` after checking that CUDA is usable and the index exists."""
    import torch

    if not torch.cuda.is_available():
        raise DiffsimError("backend cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                           "use --backend cpu-tiny on a machine without a GPU")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DiffsimError(f"backend cuda: device index {index} out of range (this machine has {count} GPU(s))")
    return f"cuda:{index}"


class CudaExecutor(PipelineExecutor):
    def __init__(
        self,
        model: str,
        *,
        weights: str | Path = "random",
        device_index: int = 0,
        discriminator: bool = True,
        discriminator_weights: str | Path | None = None,
        discriminator_arch: str | None = None,
        discriminator_image_size: int | None = None,
        compile_unet: bool = False,
        seed: int = 0,
    ):
        spec = get_spec(model, "full")
        super().__init__(
            spec,
            backend="cuda",
            weights=weights,
            device=cuda_device(device_index),
            dtype="fp16",
            discriminator=discriminator,
            discriminator_weights=discriminator_weights,
            discriminator_arch=discriminator_arch,
            discriminator_image_size=discriminator_image_size,
            # fp32, as DiffServe ran its discriminator.
            discriminator_dtype="fp32",
            compile_unet=compile_unet,
            seed=seed,
        )

    def gpu_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(self.device)
