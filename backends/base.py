"""The executor: what a serving worker runs. Load one model (and the discriminator), generate a batch,
score a batch, report memory, unload.

The interface is narrow and takes and returns plain data (prompt strings, integer seeds, PIL images or
PNG bytes, numpy arrays, a small memory record), and an executor shares no mutable state with its caller,
so a worker can later host it in another process or on another machine without changing the policy code.

:class:`PipelineExecutor` is the one implementation: the ``cuda`` and ``cpu-tiny`` backends
(:mod:`backends.cuda`, :mod:`backends.cpu_tiny`) are this class with a different spec size, dtype and device.
Seeding: image i of a batch is generated from its own ``torch.Generator`` seeded with ``seeds[i]``, so an
image depends on its prompt and seed, not on the other prompts it was batched with (up to the last bits of
batched arithmetic).

A call that raises (out of memory, typically) leaves the pipeline as :meth:`PipelineExecutor.load` built
it: SDXL's pipeline casts its fp16 VAE to fp32 for the decode and back only after a decode that succeeded,
so one OOM there used to leave an fp32 VAE and every later call failed with "Input type (c10::Half) and
bias type (float) should be the same". See :meth:`PipelineExecutor._recover`.

PNG encoding (:func:`to_png`, :func:`encode_pngs`) runs on a small shared thread pool and through ``zlib``,
which releases the interpreter lock, so the images of a batch are encoded in parallel and the other
workers' threads of the process keep running meanwhile (Pillow's PNG writer holds the lock throughout).
"""

from __future__ import annotations

import abc
import gc
import io
import os
import struct
import threading
import traceback
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from diffsim.errors import DiffsimError

from .building import cast_dtype
from .specs import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image


@dataclass(frozen=True)
class MemoryUsage:
    """Memory in use by the executor's device.

    On CUDA: bytes allocated by PyTorch on the device now, and the peak since the last
    :meth:`Executor.reset_peak_memory` (``torch.cuda.memory_allocated`` / ``max_memory_allocated``; reserved
    bytes of the caching allocator are higher). On CPU: the resident set size of the whole process, and no
    peak (``peak_bytes`` None): RSS is shared by everything in the process and its peak cannot be reset.
    """

    device: str
    kind: str  # "cuda-allocated" or "process-rss"
    in_use_bytes: int
    peak_bytes: Optional[int]


class Executor(abc.ABC):
    """One model (plus the discriminator) on one device, for one worker."""

    backend: str
    model: str

    @abc.abstractmethod
    def load(self) -> None:
        """Build the pipeline and the discriminator. Idempotent."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list["PIL.Image.Image"]:
        """One batch: image i for ``prompts[i]`` from seed ``seeds[i]``."""

    @abc.abstractmethod
    def score(self, images: Sequence["PIL.Image.Image"]) -> np.ndarray:
        """The discriminator's confidence P(real) per image, float in [0, 1]."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the models and their device memory. ``load`` may be called again afterwards."""

    @abc.abstractmethod
    def memory(self) -> MemoryUsage: ...

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (no-op where there is no resettable peak)."""

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU), so a wall-clock timer around a call is honest."""

    @property
    def loaded(self) -> bool:
        return False

    def generate_png(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[bytes]:
        """:meth:`generate`, with each image encoded as PNG bytes (for a worker in another process)."""
        return encode_pngs(self.generate(prompts, seeds))

    def __enter__(self) -> "Executor":
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.unload()


# zlib level 1: about 3x faster than Pillow's default PNG (level 6, adaptive filters) on 1024 px images
# (~65 against ~200 ms here), for files ~9% larger.
PNG_COMPRESS_LEVEL = 1
_PNG_COLOR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}  # mode -> (PNG colour type, bytes per pixel)


def to_png(image: "PIL.Image.Image") -> bytes:
    """PNG bytes of ``image``. 8-bit L / RGB / RGBA images (every generated image) are written here: each
    row with PNG's "Sub" filter (the difference to the pixel on its left, computed by numpy) and the whole
    compressed by ``zlib``, which -- unlike Pillow's PNG writer -- releases the interpreter lock while it
    works. Other modes go through Pillow."""
    if image.mode not in _PNG_COLOR_TYPES:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    color_type, channels = _PNG_COLOR_TYPES[image.mode]
    pixels = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * channels)
    rows = np.empty((image.height, image.width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type 1, Sub: byte - the same byte of the previous pixel (mod 256)
    rows[:, 1:channels + 1] = pixels[:, :channels]
    np.subtract(pixels[:, channels:], pixels[:, :-channels], out=rows[:, channels + 1:])
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, color_type, 0, 0, 0)
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)),
        _png_chunk(b"IEND", b""),
    ])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_encode_pool: Optional[ThreadPoolExecutor] = None
_encode_pool_lock = threading.Lock()


def _png_pool() -> ThreadPoolExecutor:
    """The process's PNG-encoding threads (up to 8: a batch's images at once on a GPU host's many cores)."""
    global _encode_pool
    with _encode_pool_lock:
        if _encode_pool is None:
            _encode_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                              thread_name_prefix="diffsim-png")
        return _encode_pool


def start_png_encoding(images: Sequence["PIL.Image.Image"]) -> list[Future]:
    """Encode ``images`` on the encoding threads; one future of PNG bytes per image, in order. The caller
    can go on (run the discriminator) while they are encoded."""
    pool = _png_pool()
    return [pool.submit(to_png, image) for image in images]


def encode_pngs(images: Sequence["PIL.Image.Image"]) -> list[bytes]:
    """PNG bytes of every image, encoded in parallel on the encoding threads."""
    return [future.result() for future in start_png_encoding(images)]


def from_png(data: bytes) -> "PIL.Image.Image":
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class PipelineExecutor(Executor):
    """A diffusers pipeline plus the discriminator, on one device in one dtype.

    ``weights``: "random", "hub", a hub id or a pipeline directory (see :mod:`backends.pipelines`).
    ``discriminator``: build and load the discriminator (``discriminator_weights`` None = seeded random head,
    fine for profiling; a ``.safetensors`` file otherwise). ``compile_unet``: wrap the UNet in
    ``torch.compile(mode="reduce-overhead")`` with a dynamic batch dimension (opt-in; its first calls
    compile and are slow); a call whose UNet ran eagerly after all is an error (:mod:`backends.compiling`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        backend: str,
        weights: str | Path = "random",
        device: str = "cpu",
        dtype: str = "fp32",
        discriminator: bool = True,
        discriminator_weights: str | Path | None = None,
        discriminator_arch: str | None = None,
        discriminator_image_size: int | None = None,
        discriminator_dtype: str | None = None,
        compile_unet: bool = False,
        seed: int = 0,
    ):
        from .pipelines import parse_weights

        self.spec = spec
        self.backend = backend
        self.model = spec.name
        self.weights = parse_weights(weights, spec)  # fails early on a bad source, before any loading
        self.device = device
        self.dtype = dtype
        self.want_discriminator = discriminator
        self.discriminator_weights = discriminator_weights
        self.discriminator_arch = discriminator_arch
        self.discriminator_image_size = discriminator_image_size
        self.discriminator_dtype = discriminator_dtype
        self.compile_unet = compile_unet
        self.seed = seed
        self._pipe = None
        self._discriminator = None
        self._vae_dtype = None  # the VAE's dtype as loaded: restored after a failed call (see _recover)
        self._compile_watch = None  # backends.compiling.CompileWatch when the UNet is compiled

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def load(self) -> None:
        if self._pipe is not None:
            return
        from .pipelines import build_pipeline

        pipe = build_pipeline(self.spec, self.weights, device=self.device, dtype=self.dtype, seed=self.seed)
        self._vae_dtype = pipe.vae.dtype
        if self.compile_unet:
            from .compiling import compile_unet

            self._compile_watch = compile_unet(pipe, self.model)
        if self.want_discriminator:
            self._discriminator = self._build_discriminator()
        self._pipe = pipe

    def _build_discriminator(self):
        try:
            from .discriminator import build_discriminator
        except ImportError as e:
            raise DiffsimError(f"the discriminator is unavailable: cannot import backends.discriminator ({e})")
        return build_discriminator(
            self.discriminator_arch,
            weights=self.discriminator_weights,
            device=self.device,
            dtype=self.discriminator_dtype,
            image_size=self.discriminator_image_size,
        )

    def unload(self) -> None:
        if self._compile_watch is not None:
            self._compile_watch.release()
            self._compile_watch = None
        self._pipe = None
        self._discriminator = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- work --------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list["PIL.Image.Image"]:
        prompts, seeds = list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise DiffsimError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if any(not isinstance(p, str) for p in prompts):
            raise DiffsimError("generate: every prompt must be a string")
        if not prompts:
            return []
        self.load()
        import torch

        spec = self.spec
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        try:
            with torch.inference_mode():
                out = self._pipe(
                    prompt=prompts,
                    num_inference_steps=spec.steps,
                    guidance_scale=spec.guidance_scale,
                    height=spec.resolution,
                    width=spec.resolution,
                    generator=generators,
                    output_type="pil",
                )
        except Exception as e:
            self._recover(e)
            raise
        self._check_compiled()
        return list(out.images)

    def _recover(self, error: BaseException) -> None:
        """Undo what a call that raised left behind, so that the next call works:

        * the VAE's dtype: SDXL's ``__call__`` casts a ``force_upcast`` VAE to fp32 before decoding and back to
          fp16 only after a decode that returned (diffusers' pipeline_stable_diffusion_xl.py); after an OOM in
          the decode it stayed fp32 and fed fp16 latents to fp32 convolutions on every later call;
        * the memory: the failed call's frames (latents, activations) are still referenced by the exception's
          traceback; their locals are cleared (line numbers stay) and the CUDA cache emptied, so the memory
          goes back before the next batch instead of when the caller drops the exception.
        """
        traceback.clear_frames(error.__traceback__)
        try:
            vae = self._pipe.vae
            if self._vae_dtype is not None and vae.dtype != self._vae_dtype:
                cast_dtype(vae, self._vae_dtype)  # not .to(dtype=): see backends.building
        finally:
            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    def _check_compiled(self) -> None:
        """With ``compile_unet``, refuse a result whose UNet ran eagerly (dynamo fell back): a profile of it
        would carry the label "compiled" with eager latencies."""
        watch = self._compile_watch
        if watch is not None and watch.eager_runs:
            raise DiffsimError(f"torch.compile: the UNet of {self.model} ran eagerly ({watch.describe()}): dynamo "
                               f"fell back (recompile limit, or a frame it skips); TORCH_LOGS=recompiles says why")

    def score(self, images: Sequence["PIL.Image.Image"]) -> np.ndarray:
        images = list(images)
        if not images:
            return np.zeros(0, dtype=np.float64)
        self.load()
        if self._discriminator is None:
            raise DiffsimError(f"executor for {self.model} was built without a discriminator")
        return np.asarray(self._discriminator.score(images), dtype=np.float64)

    # -- device ------------------------------------------------------------------------------------

    def memory(self) -> MemoryUsage:
        if self.device.startswith("cuda"):
            import torch

            return MemoryUsage(
                device=self.device,
                kind="cuda-allocated",
                in_use_bytes=int(torch.cuda.memory_allocated(self.device)),
                peak_bytes=int(torch.cuda.max_memory_allocated(self.device)),
            )
        return MemoryUsage(device=self.device, kind="process-rss", in_use_bytes=process_rss_bytes(), peak_bytes=None)

    def reset_peak_memory(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, weights={self.weights.describe()!r}, "
                f"device={self.device!r}, dtype={self.dtype!r})")
