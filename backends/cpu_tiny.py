"""The ``cpu-tiny`` backend: the tiny variant of each model (same architecture flags, a few M parameters,
64x64 images) in fp32 on the CPU, through the same code path as ``cuda``.

For tests, CI and trying the serving stack on a laptop: its latencies say nothing about a GPU, and its
images (random weights) are noise. A random-weight discriminator reads the images at 64x64; trained
discriminator weights bring their own input size.
"""

from __future__ import annotations

from pathlib import Path

from .base import PipelineExecutor
from .specs import get_spec

TINY_DISCRIMINATOR_IMAGE_SIZE = 64


class CpuTinyExecutor(PipelineExecutor):
    def __init__(
        self,
        model: str,
        *,
        weights: str | Path = "random",
        discriminator: bool = True,
        discriminator_weights: str | Path | None = None,
        discriminator_arch: str | None = None,
        discriminator_image_size: int | None = None,
        seed: int = 0,
    ):
        if discriminator_image_size is None and discriminator_weights is None:
            discriminator_image_size = TINY_DISCRIMINATOR_IMAGE_SIZE  # trained weights bring their own size
        super().__init__(
            get_spec(model, "tiny"),
            backend="cpu-tiny",
            weights=weights,
            device="cpu",
            dtype="fp32",
            discriminator=discriminator,
            discriminator_weights=discriminator_weights,
            discriminator_arch=discriminator_arch,
            discriminator_image_size=discriminator_image_size,
            seed=seed,
        )
