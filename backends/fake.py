"""An executor that makes no real image: a stand-in of known latency for testing the serving system.

It does what a :class:`backends.base.Executor` does for the engine and the workers -- load, generate a
batch, score it, unload -- in a fixed time per batch and with answers that follow from the inputs: the
image of seed s is an 8x8 picture whose colour encodes s, and its confidence is ``(s mod 100) / 100``.
Tests and benchmarks use it to exercise routing, batching, deferral, worker loss and Ray placement
without paying for diffusion (which on two CPU cores would dominate every figure), and to measure the
engine's own ceiling with zero-latency workers. It imports neither torch nor diffusers.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import numpy as np


def seed_confidence(seed: int) -> float:
    return (int(seed) % 100) / 100.0


_CONFIDENCE = "diffsim_confidence"  # PIL image info key: a stand-in's confidence, from generate() to score()


class FixedLatencyExecutor:
    """``latency_s`` / ``score_latency_s``: seconds per batch, a number or a function of the batch size (0: as
    fast as it can). ``confidence(prompt, seed)``: the score of that image (default: from the seed, as
    :func:`seed_confidence`). ``sleep`` is injectable so tests need not wait."""

    def __init__(self, model: str, latency_s: Union[float, Callable[[int], float]] = 0.0, *,
                 score_latency_s: Union[float, Callable[[int], float]] = 0.0,
                 confidence: Optional[Callable[[str, int], float]] = None,
                 sleep: Callable[[float], None] = time.sleep, backend: str = "fake"):
        self.model = model
        self._latency = latency_s if callable(latency_s) else (lambda n, s=float(latency_s): s)
        self._score_latency = (score_latency_s if callable(score_latency_s)
                               else (lambda n, s=float(score_latency_s): s))
        self.confidence = confidence
        self.sleep = sleep
        self.backend = backend
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]):
        from PIL import Image

        if not self.loaded:
            raise RuntimeError(f"{self.model}: generate() before load()")
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        delay = self._latency(len(prompts))
        if delay > 0:
            self.sleep(delay)
        images = [Image.new("RGB", (8, 8), (int(s) % 256, (int(s) // 256) % 256, 0)) for s in seeds]
        if self.confidence is not None:
            for image, prompt, seed in zip(images, prompts, seeds):
                image.info[_CONFIDENCE] = self.confidence(prompt, int(seed))
        return images

    def score(self, images) -> np.ndarray:
        delay = self._score_latency(len(images))
        if delay > 0:
            self.sleep(delay)
        return np.array([im.info[_CONFIDENCE] if _CONFIDENCE in im.info
                         else seed_confidence(im.getpixel((0, 0))[0] + 256 * im.getpixel((0, 0))[1]) for im in images])

    def synchronize(self) -> None:
        pass


class FixedLatencyFactory:
    """An executor factory for ``diffsim serve`` internals (``(worker, role, model) -> executor``): light
    and heavy batches take ``light_s`` and ``heavy_s`` seconds. A plain class, so that it pickles by
    reference and can be shipped to Ray actors."""

    def __init__(self, light_s: float = 0.0, heavy_s: float = 0.0):
        self.latency = {"light": light_s, "heavy": heavy_s}

    def __call__(self, worker: int, role: str, model: str) -> FixedLatencyExecutor:
        return FixedLatencyExecutor(model, self.latency[role])
