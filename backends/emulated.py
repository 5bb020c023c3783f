"""The ``emulated`` backend: workers that take a GPU profile's time per batch and make no real image.

``diffsim serve --backend emulated --gpu-profile a100|FILE`` runs the whole serving system -- HTTP,
admission, the controller and allocator, routing, batching, deferral, worker health, Ray placement --
with executors that *sleep* for the profile's p50 time of each batch (the model's table; plus the
discriminator's for a scored light batch) instead of computing. It answers two questions without GPUs:

* how the serving stack itself behaves at a scale or speed the machine cannot compute (A100 times on a
  laptop), e.g. to load-test admission, deadlines and drain, or to compare ``diffsim validate`` against a
  server whose batch times are known exactly;
* what the server does when its workers are not competing with it for the CPU: ``cpu-tiny`` computes on
  the same cores as the server's event loop, so on a small machine an overload measures CPU starvation
  as much as the policy (``benchmarks/bench_promises.py`` runs both).

Images are 8x8 stand-ins whose colour encodes the seed. The discriminator's confidence follows the
cascade's deferral curve exactly as the simulator's does (:class:`diffsim.runtime.confidence.Confidences`
from the curve): the inverse CDF of a stable uniform of (prompt, seed), so a (prompt, seed) pair always
gets the same confidence, on every worker, and the fraction of prompts below a threshold t is f(t).

The executor is plain data (the latency tables and the curve), so it pickles by value for Ray actors.
It imports neither torch nor diffusers.
"""

from __future__ import annotations

import time
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

from diffsim.errors import DiffsimError
from diffsim.profiles import Cascade, DeferralCurve, LatencyTable
from diffsim.runtime.confidence import STREAM_CONFIDENCE, stable_uniform

from .base import Executor, MemoryUsage

IMAGE_SIZE = 8
_KEY = "diffsim_confidence"  # PIL image info key carrying the stand-in's confidence to score()


def prompt_key(prompt: str, seed: int) -> int:
    """A 64-bit key of (prompt, seed): the same in every process (unlike ``hash``)."""
    return (zlib.crc32(prompt.encode("utf-8")) << 32) | (int(seed) & 0xFFFFFFFF)


class EmulatedExecutor(Executor):
    """One model (and, for a light worker, the discriminator) timed by a profile; see the module docstring.

    ``times`` / ``score_times``: the profile's latency tables of the model and of the discriminator (None:
    this worker does not score); a batch takes the table's p50 for its size, interpolated between measured
    sizes as the simulator and the allocator read it (:meth:`~diffsim.profiles.LatencyTable.latency_ms`).
    ``sleep`` is injectable so tests need not wait."""

    backend = "emulated"

    def __init__(self, model: str, times: LatencyTable, *, score_times: Optional[LatencyTable],
                 deferral: DeferralCurve, seed: int = 0, sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self.times = times
        self.score_times = score_times
        self.deferral = deferral
        self.seed = seed
        self.sleep = sleep
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def _time_s(self, table: LatencyTable, n: int, what: str) -> float:
        ms = table.latency_ms(n)
        if ms is None:
            raise DiffsimError(f"backend emulated: the profile has no {what} time at batch size {n} "
                               f"(measured: {', '.join(map(str, table.batch_sizes))})")
        return ms / 1e3

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]):
        from PIL import Image

        if not self._loaded:
            raise RuntimeError(f"{self.model}: generate() before load()")
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self.sleep(self._time_s(self.times, len(prompts), self.model))
        images = []
        for prompt, seed in zip(prompts, seeds):
            s = int(seed)
            im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (s % 256, (s >> 8) % 256, (s >> 16) % 256))
            u = stable_uniform(prompt_key(prompt, s), self.seed, STREAM_CONFIDENCE)
            im.info[_KEY] = self.deferral.inverse(u)
            images.append(im)
        return images

    def score(self, images) -> np.ndarray:
        if self.score_times is None:
            raise RuntimeError(f"{self.model}: this worker has no discriminator")
        self.sleep(self._time_s(self.score_times, len(images), "discriminator"))
        try:
            return np.array([im.info[_KEY] for im in images], dtype=float)
        except KeyError:
            raise ValueError("backend emulated scores only its own stand-in images") from None

    def memory(self) -> MemoryUsage:
        return MemoryUsage(device="emulated", kind="none", in_use_bytes=0, peak_bytes=None)


class EmulatedFactory:
    """``(worker, role, model) -> EmulatedExecutor`` for ``diffsim serve``: a plain class holding plain data,
    so it pickles for Ray actors."""

    def __init__(self, cascade: Cascade, seed: int = 0):
        self.tables = {"light": cascade.light, "heavy": cascade.heavy}
        self.models = {"light": cascade.light_model, "heavy": cascade.heavy_model}
        self.score_times = cascade.discriminator
        self.deferral = cascade.deferral
        self.seed = seed

    def __call__(self, worker: int, role: str, model: str) -> EmulatedExecutor:
        if model != self.models[role]:
            raise DiffsimError(f"backend emulated: the {role} worker was asked for {model}, "
                               f"the cascade's {role} model is {self.models[role]}")
        return EmulatedExecutor(model, self.tables[role], score_times=self.score_times if role == "light" else None,
                                deferral=self.deferral, seed=self.seed)
