"""One serving worker: the executors of one GPU (or CPU slot), run on a thread of their own.

The engine talks to a worker only through :class:`WorkerHandle`: a few async calls that take and return
plain data (:class:`BatchJob` in, :class:`BatchResult` out, strings and numbers otherwise). Nothing of
the policy lives here, and nothing here is shared with the engine, so a worker can later run in another
process or on another machine (a Ray actor with the same methods) without touching the policy code.
The worker's FIFO queue and its batching are the engine's (:class:`diffsim.runtime.dispatcher.Dispatcher`);
the worker runs exactly the batch it is handed.

:class:`ThreadWorker` is the in-process implementation: one single-thread executor pool per worker, so
its calls run one at a time in the order they were made (a model swap asked for before a batch happens
before it). Both of the cascade's models are resident by default, as in the DiffServe testbed; with
``swap=True`` at most one is loaded at a time: taking the other role unloads the current model before
loading the new one, which keeps memory in bounds at the price of the load time.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

ROLES = ("light", "heavy")


@dataclass(frozen=True)
class BatchJob:
    """One batch for a worker: generate one image per prompt; score them when ``score`` is set."""

    role: str  # "light" or "heavy"
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    score: bool  # run the discriminator on the images (light stage in cascade mode)


@dataclass(frozen=True)
class BatchResult:
    images_png: tuple[bytes, ...]  # one PNG per prompt, in order
    confidences: Optional[tuple[float, ...]]  # P(real) per image when scored
    run_s: float  # wall time of the whole call in the worker (model swap included, if any)
    swap_s: float = 0.0  # part of run_s spent loading a model


@dataclass(frozen=True)
class WorkerInfo:
    index: int
    device: str
    models: dict[str, str]  # role -> model name
    loaded: tuple[str, ...]  # roles whose model is resident
    load_s: dict[str, float] = field(default_factory=dict)  # role -> seconds its last load took


class WorkerLost(Exception):
    """The worker is gone (its process, actor or node died): the batch it was given did not fail, it
    was not run, or its result cannot be had. Raised by a :class:`WorkerHandle`."""


PROBE_JOB = BatchJob("light", ("a probe: is this worker serving again?",), (0,), True)


class WorkerHandle(Protocol):
    """What the engine needs from a worker; every argument and result is plain data."""

    index: int

    async def start(self, initial_role: Optional[str]) -> WorkerInfo: ...

    async def prepare(self, role: str) -> WorkerInfo: ...

    async def run(self, job: BatchJob) -> BatchResult: ...

    async def probe(self) -> WorkerInfo:
        """Make the worker ready again (reload its models if it was restarted) and run one small batch;
        raises if it cannot serve."""
        ...

    async def stop(self) -> None: ...


class WorkerCore:
    """Executors on one device, called synchronously (from a worker thread or inside a Ray actor).

    ``make_executor(role)`` returns a new, unloaded :class:`backends.base.Executor` for the role's model
    (the light one with the discriminator). With ``swap=False`` both are loaded at start; with
    ``swap=True`` only the initial role's model is, and :meth:`prepare` / :meth:`run` swap as needed.
    """

    def __init__(self, index: int, make_executor: Callable[[str], object], *, swap: bool = False,
                 device: str = "cpu"):
        self.index = index
        self.swap = swap
        self.device = device
        self._make_executor = make_executor
        self._executors: dict[str, object] = {}
        self._models: dict[str, str] = {}
        self._load_s: dict[str, float] = {}

    def _executor(self, role: str):
        ex = self._executors.get(role)
        if ex is None:
            ex = self._executors[role] = self._make_executor(role)
            self._models[role] = str(getattr(ex, "model", role))
        return ex

    def _ensure(self, role: str) -> float:
        """Make ``role``'s model resident (unloading the other one first in swap mode); seconds spent."""
        ex = self._executor(role)
        if getattr(ex, "loaded", False):
            return 0.0
        started = time.perf_counter()
        if self.swap:
            for other, other_ex in self._executors.items():
                if other != role and getattr(other_ex, "loaded", False):
                    other_ex.unload()
        ex.load()
        spent = time.perf_counter() - started
        self._load_s[role] = spent
        return spent

    def _info(self) -> WorkerInfo:
        loaded = tuple(r for r in ROLES if r in self._executors and getattr(self._executors[r], "loaded", False))
        return WorkerInfo(self.index, self.device, dict(self._models), loaded, dict(self._load_s))

    def start(self, initial_role: Optional[str]) -> WorkerInfo:
        for role in ROLES:
            self._executor(role)  # builds (cheap) so that the model names are known
        if self.swap:
            if initial_role is not None:
                self._ensure(initial_role)
        else:
            for role in ROLES:
                self._ensure(role)
        return self._info()

    def prepare(self, role: str) -> WorkerInfo:
        self._ensure(role)
        return self._info()

    def probe(self) -> WorkerInfo:
        """Models resident as at start (both, or the light one in swap mode), then one light batch of one
        image, scored: the worker can serve."""
        self.start("light")
        self.run(PROBE_JOB)
        return self._info()

    def run(self, job: BatchJob) -> BatchResult:
        """Generate, score (light batches) and PNG-encode one batch.

        The images are encoded on the process's PNG threads (:func:`backends.base.start_png_encoding`: in
        parallel, without the interpreter lock) while the discriminator scores them, not one after another
        on this thread after the GPU work (47 ms per 512 px and 127 ms per 1024 px image with Pillow: +1 s
        on an SDXL-Lightning batch of 8). What encoding still costs after the GPU work stays in ``run_s``:
        the engine answers a batch only with its images. :func:`measure_profile` therefore times the
        models with their encoding, so the profile the server plans with includes it.
        """
        from backends.base import start_png_encoding

        started = time.perf_counter()
        swap_s = self._ensure(job.role)
        ex = self._executor(job.role)
        images = ex.generate(list(job.prompts), list(job.seeds))
        if len(images) != len(job.prompts):
            raise RuntimeError(f"executor returned {len(images)} images for {len(job.prompts)} prompts")
        encoding = start_png_encoding(images)
        confidences = None
        if job.score:
            scores = ex.score(images)
            confidences = tuple(float(s) for s in scores)
            if len(confidences) != len(images):
                raise RuntimeError(f"discriminator returned {len(confidences)} scores for {len(images)} images")
        ex.synchronize()
        pngs = tuple(future.result() for future in encoding)
        return BatchResult(pngs, confidences, time.perf_counter() - started, swap_s)

    def stop(self) -> None:
        for ex in self._executors.values():
            if getattr(ex, "loaded", False):
                ex.unload()

    def measure(self, batch_sizes: Sequence[int], warmup: int, iters: int) -> dict:
        """Batch latency of both models and the discriminator on this worker (see :func:`measure_profile`)."""
        return measure_profile(self._executor, self._ensure, batch_sizes, warmup=warmup, iters=iters)


class ThreadWorker:
    """A :class:`WorkerCore` in the engine's process, on a thread of its own."""

    def __init__(self, index: int, make_executor: Callable[[str], object], *, swap: bool = False,
                 device: str = "cpu"):
        self.index = index
        self.device = device
        self.core = WorkerCore(index, make_executor, swap=swap, device=device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffsim-worker-{index}")

    async def _call(self, fn, *args):
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def start(self, initial_role: Optional[str] = None) -> WorkerInfo:
        return await self._call(self.core.start, initial_role)

    async def prepare(self, role: str) -> WorkerInfo:
        return await self._call(self.core.prepare, role)

    async def run(self, job: BatchJob) -> BatchResult:
        return await self._call(self.core.run, job)

    async def probe(self) -> WorkerInfo:
        return await self._call(self.core.probe)

    async def measure(self, batch_sizes: Sequence[int], warmup: int = 1, iters: int = 3) -> dict:
        return await self._call(self.core.measure, tuple(batch_sizes), warmup, iters)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Unload the models; a worker stuck in a batch that never returns is left behind after
        ``timeout_s`` (its thread cannot be killed) so that stopping the server always ends."""
        try:
            await asyncio.wait_for(self._call(self.core.stop), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self._pool.shutdown(wait=False)


def measure_profile(executor_of: Callable[[str], object], ensure: Callable[[str], float],
                    batch_sizes: Sequence[int], *, warmup: int, iters: int) -> dict:
    """Latency tables of the light model, the heavy model and the discriminator, measured the way
    ``diffsim profile`` measures them (:mod:`diffsim.profiling.profiler`), on already built executors.

    A model's batch is timed with the PNG encoding of its images, as :meth:`WorkerCore.run` pays it (the
    engine books the whole run; ``diffsim profile`` times ``generate`` alone). A light batch encodes while
    it is scored, so adding the discriminator's table to the light model's slightly overstates it.
    A batch size that runs out of memory is null, and so are the larger ones (not attempted: each would
    run out too, and an OOM is the slowest way to learn it).

    Returns ``{"models": {name: table}, "discriminator": table, "load_s": {role: s}}`` with tables in
    the GPU-profile format. In swap mode measuring the heavy model unloads the light one, so the light
    model is measured first and re-loaded at the end.
    """
    from backends.base import encode_pngs

    from ..profiling.profiler import Series, measure_batch, profile_discriminator, prompts_for

    tables: dict[str, dict] = {}
    load_s: dict[str, float] = {}
    disc_table = None
    for role in ROLES:
        load_s[role] = ensure(role)
        ex = executor_of(role)
        series = Series(list(batch_sizes))
        out_of_memory = False
        for b in batch_sizes:
            if out_of_memory:
                series.add(None, None)
                continue
            prompts, seeds = prompts_for(b), list(range(b))
            samples, peak = measure_batch(ex, lambda: encode_pngs(ex.generate(prompts, seeds)),
                                          warmup=warmup, iters=iters)
            series.add(samples, peak)
            out_of_memory = samples is None
        tables[str(ex.model)] = series.to_table()
        if role == "light":
            disc_table = profile_discriminator(ex, batch_sizes, warmup=warmup, iters=iters,
                                               progress=lambda line: None).to_table()
    ensure("light")
    return {"models": tables, "discriminator": disc_table, "load_s": load_s}
