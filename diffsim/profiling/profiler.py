"""Measure a GPU profile: whole-pipeline batch latency per model, the discriminator's latency per batch and
peak memory, written in the :class:`~diffsim.profiles.GpuProfile` format the simulator reads.

Method, per model and batch size b: ``warmup`` untimed calls, then ``iters`` timed calls of
``executor.generate(b prompts, b seeds)`` -- text encoding, every denoising step, VAE decode and the
conversion to PIL images, i.e. what a serving worker pays per batch. Each call is timed by the wall clock
between two device synchronisations (``torch.cuda.synchronize``), which covers host-side work (PIL
conversion, the safety checker's host syncs) that CUDA events around the GPU stream would miss. p50/p95/p99
are numpy's linear-interpolated percentiles of those ``iters`` samples.

The discriminator is timed the same way on b images of the first model's output size, through the first
model's executor, i.e. exactly the worker's ``score`` call (PIL preprocessing included).

Peak memory (GiB) per model and batch size, on CUDA, is ``torch.cuda.max_memory_allocated`` over the batch's
calls: what the worker holds (pipeline weights, the discriminator's weights, activations). On CPU it is
recorded as null, since the process RSS is shared and its peak cannot be reset; the discriminator's row has
no peak memory either (it runs beside a resident diffusion model, whose weights would dominate it).
A batch that runs out of memory is recorded as null, and larger batch sizes of that model (or of the
discriminator) are not attempted (recorded as null too); profiling goes on with the next model. The executor
puts its pipeline back as it was loaded after the failed call (:meth:`backends.base.PipelineExecutor._recover`),
so the discriminator measured next through it, and a server's worker that met the OOM while measuring at
start-up, go on working.

Concurrency (``--concurrency N``): a serving worker rarely runs alone. With N, every measurement runs on N
executors of the model at once (N threads started together; on CUDA on N devices, one each, as N serving
workers would be), and the percentiles are those of all N x iters samples. Under load every worker is
busy, and what they share -- CPU cores and memory bandwidth on ``cpu-tiny``, the host, PCIe and the CPU
threads of VAE decoding and image conversion on GPUs -- makes each batch slower than alone. The profile
records the concurrency it was measured at (``concurrency:``); ``diffsim serve`` measures its start-up
profile with every worker busy for the same reason.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import yaml

from ..errors import DiffsimError
from ..profiles import GpuProfile, validation_message
from ..workload.prompts import SAMPLE_CAPTIONS

GIB = 1024**3
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)

PROMPTS = SAMPLE_CAPTIONS


@dataclass
class Series:
    """Measurements of one model (or the discriminator) at each batch size; None = not measured / OOM."""

    batch_sizes: list[int]
    p50_ms: list[Optional[float]] = field(default_factory=list)
    p95_ms: list[Optional[float]] = field(default_factory=list)
    p99_ms: list[Optional[float]] = field(default_factory=list)
    peak_mem_gib: list[Optional[float]] = field(default_factory=list)

    def add(self, samples_ms: Optional[Sequence[float]], peak_gib: Optional[float]) -> None:
        if samples_ms is None:
            for series in (self.p50_ms, self.p95_ms, self.p99_ms, self.peak_mem_gib):
                series.append(None)
            return
        p50, p95, p99 = np.percentile(np.asarray(samples_ms, dtype=float), [50, 95, 99])
        self.p50_ms.append(round(float(p50), 3))
        self.p95_ms.append(round(float(p95), 3))
        self.p99_ms.append(round(float(p99), 3))
        self.peak_mem_gib.append(None if peak_gib is None else round(peak_gib, 3))

    def to_table(self) -> dict:
        table = {
            "batch_sizes": list(self.batch_sizes),
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
        }
        if any(v is not None for v in self.peak_mem_gib):
            table["peak_mem_gib"] = self.peak_mem_gib
        return table


def is_out_of_memory(err: BaseException) -> bool:
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(err, (RuntimeError, MemoryError)) and (
        isinstance(err, MemoryError) or "out of memory" in str(err).lower()
    )


Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter; tests pass a fake one)


def time_calls(call: Callable[[], object], sync: Callable[[], None], *, warmup: int, iters: int,
               clock: Clock = time.perf_counter) -> list[float]:
    """Milliseconds of ``iters`` calls by ``clock`` after ``warmup`` untimed ones, synchronised around each."""
    for _ in range(warmup):
        call()
    sync()
    samples = []
    for _ in range(iters):
        sync()
        t0 = clock()
        call()
        sync()
        samples.append((clock() - t0) * 1000.0)
    return samples


def measure_batch(executor, call, *, warmup: int, iters: int,
                  clock: Clock = time.perf_counter) -> tuple[Optional[list[float]], Optional[float]]:
    """(latency samples in ms, peak GiB or None) of one batch, or (None, None) when it ran out of memory."""
    _free_device_cache(executor)
    executor.reset_peak_memory()
    try:
        samples = time_calls(call, executor.synchronize, warmup=warmup, iters=iters, clock=clock)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; anything else is re-raised
        if not is_out_of_memory(e):
            raise
        _free_device_cache(executor)
        return None, None
    peak = executor.memory().peak_bytes
    return samples, (None if peak is None else peak / GIB)


def measure_group(executors: Sequence[object], make_call: Callable[[object], Callable[[], object]], *, warmup: int,
                  iters: int, clock: Clock = time.perf_counter) -> tuple[Optional[list[float]], Optional[float]]:
    """:func:`measure_batch` on several executors at once (threads started together); the samples of all
    of them, the highest peak; (None, None) when any ran out of memory. One executor: no thread."""
    if len(executors) == 1:
        return measure_batch(executors[0], make_call(executors[0]), warmup=warmup, iters=iters, clock=clock)
    barrier = threading.Barrier(len(executors))
    results: list = [None] * len(executors)
    errors: list[Optional[BaseException]] = [None] * len(executors)

    def run(i: int) -> None:
        ex = executors[i]
        try:
            barrier.wait()
            results[i] = measure_batch(ex, make_call(ex), warmup=warmup, iters=iters, clock=clock)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            errors[i] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), name=f"diffsim-profile-{i}") for i in range(len(executors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise e
    if any(r is None or r[0] is None for r in results):
        return None, None
    samples = [s for r in results for s in r[0]]
    peaks = [r[1] for r in results if r[1] is not None]
    return samples, (max(peaks) if peaks else None)


def _free_device_cache(executor) -> None:
    """Return cached CUDA blocks between batch sizes, so one batch's leftovers do not crowd the next."""
    if str(getattr(executor, "device", "")).startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def prompts_for(batch_size: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]


def profile_models(
    executors: Callable[[str], object],
    models: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    warmup: int,
    iters: int,
    progress: Callable[[str], None] = print,
    clock: Clock = time.perf_counter,
    concurrency: int = 1,
) -> tuple[dict[str, Series], Series]:
    """Measure every model, and the discriminator through the first model's executors.

    ``executors(model, copy)`` returns a new, unloaded executor (``copy`` 0..concurrency-1); each model's
    executors are loaded, measured together (:func:`measure_group`) and unloaded in turn, so only one
    model is resident at a time. (A one-argument ``executors(model)`` is accepted at concurrency 1.)
    """
    results: dict[str, Series] = {}
    disc: Optional[Series] = None
    total = len(models) * len(batch_sizes)
    done = 0
    for model in models:
        group = [executors(model) if concurrency == 1 else executors(model, i) for i in range(concurrency)]
        executor = group[0]
        t0 = time.perf_counter()
        for ex in group:
            ex.load()
        progress(f"[profile] {model}: loaded in {time.perf_counter() - t0:.1f} s"
                 + (f" ({concurrency} copies, measured together)" if concurrency > 1 else ""))
        series = Series(list(batch_sizes))
        oom = False
        for b in batch_sizes:
            done += 1
            if oom:
                series.add(None, None)
                progress(f"[profile] {done}/{total} {model} b={b}: skipped (a smaller batch ran out of memory)")
                continue
            prompts, seeds = prompts_for(b), list(range(b))
            samples, peak = measure_group(
                group, lambda ex: (lambda: ex.generate(prompts, seeds)), warmup=warmup, iters=iters, clock=clock
            )
            series.add(samples, peak)
            if samples is None:
                oom = True
                progress(f"[profile] {done}/{total} {model} b={b}: out of memory, recorded as null")
            else:
                progress(f"[profile] {done}/{total} {model} b={b}: p50 {series.p50_ms[-1]:.1f} ms, "
                         f"p99 {series.p99_ms[-1]:.1f} ms{_mem_text(peak)}")
        if disc is None:
            disc = profile_discriminator(group, batch_sizes, warmup=warmup, iters=iters, progress=progress,
                                         clock=clock)
        for ex in group:
            ex.unload()
        results[model] = series
    assert disc is not None
    return results, disc


def profile_discriminator(executors, batch_sizes, *, warmup: int, iters: int, progress=print,
                          clock: Clock = time.perf_counter) -> Series:
    """The discriminator's latency through ``executors`` (one, or a group measured together)."""
    from PIL import Image

    group = list(executors) if isinstance(executors, (list, tuple)) else [executors]
    size = group[0].spec.resolution
    rng = np.random.default_rng(0)
    series = Series(list(batch_sizes))
    out_of_memory = False
    for b in batch_sizes:
        if out_of_memory:  # as for the models: larger batches are not attempted after an OOM
            series.add(None, None)
            progress(f"[profile] discriminator b={b}: skipped (a smaller batch ran out of memory)")
            continue
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(b)]
        samples, _ = measure_group(group, lambda ex: (lambda: ex.score(images)), warmup=warmup, iters=iters,
                                   clock=clock)
        series.add(samples, None)  # its peak would be mostly the resident diffusion model's weights
        if samples is None:
            out_of_memory = True
            progress(f"[profile] discriminator b={b}: out of memory, recorded as null")
        else:
            progress(f"[profile] discriminator b={b} ({size}x{size} images): p50 {series.p50_ms[-1]:.1f} ms")
    return series


def _mem_text(peak_gib: Optional[float]) -> str:
    return "" if peak_gib is None else f", peak {peak_gib:.2f} GiB"


# ----------------------------------------------------------------------------------------------
# Provenance


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (a file-name-friendly GPU name)."""
    name = re.sub(r"^(nvidia|amd)\s+", "", device_name.strip(), flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def nvidia_driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def software_versions(backend: str) -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if backend == "cuda":
        versions["cuda"] = str(torch.version.cuda)
        versions["driver"] = nvidia_driver_version()
    return versions


@dataclass(frozen=True)
class ProfileSettings:
    backend: str
    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    weights: str
    warmup: int
    iters: int
    device: int = 0
    gpu_name: Optional[str] = None
    discriminator_weights: Optional[str] = None
    compile_unet: bool = False
    concurrency: int = 1  # executors per model measured at once (see the module docstring)

    def check(self) -> None:
        if self.concurrency < 1:
            raise DiffsimError(f"--concurrency: must be >= 1, got {self.concurrency}")
        if not self.models:
            raise DiffsimError("--models: give at least one model")
        if len(set(self.models)) != len(self.models):
            raise DiffsimError("--models: a model is listed twice")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise DiffsimError("--batch-sizes: give positive batch sizes")
        if any(a >= b for a, b in zip(self.batch_sizes, self.batch_sizes[1:])):
            raise DiffsimError("--batch-sizes: must be strictly increasing")
        if self.warmup < 0:
            raise DiffsimError("--warmup: must be >= 0")
        if self.iters < 1:
            raise DiffsimError("--iters: must be >= 1")


def weights_for(weights: str, models: Sequence[str]) -> dict[str, str]:
    """The weights source of each model from ``--weights``: ``random`` / ``hub`` / a hub id / a pipeline
    directory for every model; a folder holding one pipeline directory per model name (``DIR/sdxs``, ...);
    or ``name=source,name=source`` per model (models not named get ``random``)."""
    if "=" not in weights:
        folder = Path(weights).expanduser()
        if folder.is_dir() and not (folder / "model_index.json").exists():
            per_model = {m: folder / m for m in models}
            if all((p / "model_index.json").is_file() for p in per_model.values()):
                return {m: str(p) for m, p in per_model.items()}
        return {m: weights for m in models}
    out = {m: "random" for m in models}
    for item in weights.split(","):
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not source:
            raise DiffsimError(f"--weights: expected NAME=SOURCE, got {item!r}")
        if name not in out:
            raise DiffsimError(f"--weights: {name!r} is not one of the profiled models ({', '.join(models)})")
        out[name] = source
    return out


def run_profile(settings: ProfileSettings, *, progress: Callable[[str], None] = print) -> GpuProfile:
    """Measure everything ``settings`` asks for and return the validated profile (not yet written)."""
    from backends import make_executor
    from backends.registry import check_backend_and_model

    settings.check()
    for model in settings.models:
        check_backend_and_model(settings.backend, model)
    per_model = weights_for(settings.weights, settings.models)

    def executor(model: str, copy: int = 0):
        device = settings.device + copy if settings.backend == "cuda" else settings.device
        return make_executor(
            settings.backend, model, weights=per_model[model], device=device,
            discriminator_weights=settings.discriminator_weights, compile_unet=settings.compile_unet,
        )

    first = executor(settings.models[0])  # fails fast (no CUDA, bad weights) before any measuring
    device_name = _device_name(first)
    gpu = settings.gpu_name or (gpu_slug(device_name) if settings.backend == "cuda" else "cpu-tiny")
    del first

    models, disc = profile_models(
        executor, settings.models, settings.batch_sizes,
        warmup=settings.warmup, iters=settings.iters, progress=progress, concurrency=settings.concurrency,
    )
    software = software_versions(settings.backend)
    software["dtype"] = "fp16" if settings.backend == "cuda" else "fp32"
    software["backend"] = settings.backend
    notes = [f"weights: {settings.weights}", "discriminator: " + (settings.discriminator_weights or "random head")]
    if settings.compile_unet:
        notes.append("UNet under torch.compile(mode='reduce-overhead')")
    if settings.backend == "cpu-tiny":
        notes.append("tiny model variants on the CPU: for tests only, not a GPU's latency")
    data = {
        "gpu": gpu,
        "provenance": {
            "source": "diffsim profile",
            "gpu": device_name,
            "date": _dt.date.today().isoformat(),
            "software": software,
            "method": (
                f"whole-pipeline batch latency (generate: text encoders, every step, VAE decode, PIL), "
                f"{settings.warmup} warm-up then {settings.iters} timed calls, wall clock between device "
                f"synchronisations; p50/p95/p99 of the timed calls; peak_mem_gib = max_memory_allocated "
                f"(null on CPU)"
                + (f"; {settings.concurrency} executors measured at once, samples pooled"
                   if settings.concurrency > 1 else "")
            ),
            "notes": "; ".join(notes),
        },
        "concurrency": settings.concurrency,
        "models": {name: series.to_table() for name, series in models.items()},
        "discriminator": disc.to_table(),
    }
    return validate_profile(data)


def validate_profile(data: dict, where: str = "measured profile") -> GpuProfile:
    from pydantic import ValidationError

    try:
        return GpuProfile.model_validate(data)
    except ValidationError as e:
        raise DiffsimError(validation_message(where, e)) from None


def _device_name(executor) -> str:
    device = str(getattr(executor, "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def write_profile(profile: GpuProfile, path: Path | str) -> Path:
    """Write ``profile`` as YAML (the format :func:`diffsim.profiles.load_gpu_profile` reads)."""
    path = Path(path)
    data = profile.model_dump(exclude_none=True)
    header = (
        f"# {profile.provenance.gpu}: whole-pipeline batch latency measured by `diffsim profile` "
        f"on {profile.provenance.date}.\n"
        "# null = ran out of memory / not attempted. Between measured batch sizes: linear interpolation "
        "(diffsim/profiles.py).\n"
    )
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise DiffsimError(f"{path}: cannot write profile: {e.strerror or e}") from None
    return path
