"""``diffsim serve --backend emulated``: workers that take a GPU profile's time per batch and make no image.

The whole serving system runs for real -- HTTP, admission, the controller and allocator, routing,
batching, deferral, worker health, Ray placement -- with executors that *sleep* for the profile's p50
time of each batch (the model's table; plus the discriminator's for a scored light batch) instead of
computing. It answers two questions without GPUs:

* how the serving stack behaves at a scale or speed the machine cannot compute (A100 times on a laptop),
  e.g. to load-test admission, deadlines and drain;
* what the server does when its workers do not compete with it for the CPU: ``cpu-tiny`` computes on the
  cores the server's event loop needs, so on a small machine an overload measures CPU starvation as much
  as the policy (``benchmarks/bench_promises.py`` runs both).

A batch of n takes the table's time for n, interpolated between measured sizes exactly as the simulator
and the allocator read it (:meth:`~diffsim.profiles.LatencyTable.latency_ms`). Images are 8x8 stand-ins
(:class:`backends.fake.FixedLatencyExecutor`). Their confidence follows the cascade's deferral curve as
the simulator's does (:class:`~diffsim.runtime.confidence.Confidences` from the curve): the inverse CDF
of a stable uniform of (prompt, seed), so a pair always gets the same confidence, on every worker and
process, and the fraction of prompts below a threshold t is f(t).

The factory holds plain data (latency tables and the curve), so it pickles for Ray actors.
"""

from __future__ import annotations

import zlib
from functools import partial

from ..errors import DiffsimError
from ..profiles import Cascade, LatencyTable
from ..runtime.confidence import STREAM_CONFIDENCE, stable_uniform

BACKEND = "emulated"


def prompt_key(prompt: str, seed: int) -> int:
    """A 64-bit key of (prompt, seed), the same in every process (unlike ``hash``)."""
    return (zlib.crc32(prompt.encode("utf-8")) << 32) | (int(seed) & 0xFFFFFFFF)


class EmulatedFactory:
    """``(worker, role, model) -> executor`` whose batches sleep for the cascade's profile times."""

    def __init__(self, cascade: Cascade, seed: int = 0):
        self.tables = {"light": cascade.light, "heavy": cascade.heavy}
        self.models = {"light": cascade.light_model, "heavy": cascade.heavy_model}
        self.discriminator = cascade.discriminator
        self.deferral = cascade.deferral
        self.seed = seed

    def batch_s(self, table: LatencyTable, what: str, n: int) -> float:
        ms = table.latency_ms(n)
        if ms is None:
            raise DiffsimError(f"backend emulated: the profile has no {what} time at batch size {n} "
                               f"(measured: {', '.join(map(str, table.batch_sizes))})")
        return ms / 1e3

    def confidence(self, prompt: str, seed: int) -> float:
        return self.deferral.inverse(stable_uniform(prompt_key(prompt, seed), self.seed, STREAM_CONFIDENCE))

    def __call__(self, worker: int, role: str, model: str):
        from backends.fake import FixedLatencyExecutor

        if model != self.models[role]:
            raise DiffsimError(f"backend emulated: the {role} worker was asked for {model}, "
                               f"the cascade's {role} model is {self.models[role]}")
        score_s = partial(self.batch_s, self.discriminator, "discriminator") if role == "light" else 0.0
        return FixedLatencyExecutor(model, partial(self.batch_s, self.tables[role], model),
                                    score_latency_s=score_s, confidence=self.confidence, backend=BACKEND)
