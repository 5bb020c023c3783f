"""Build one diffusers pipeline from a :class:`~backends.specs.ModelSpec` and a weights source.

A weights source is one of:

* ``random`` -- every component built from the spec's configs with seeded random weights (no download;
  latency does not depend on weight values). The tokenizer is the byte-level one of
  :mod:`backends.tokenizer`. The same (model, seed) gives the same weights in every worker, process and
  restart: they come from private generators (:func:`backends.building.seed_weights`), never from the
  global torch RNG, which another worker building at the same time would also draw from.
* ``hub`` -- the spec's own hub id; or an explicit hub id ``owner/name``: the real ``from_pretrained``
  path (it needs the model hub, which the build machines cannot reach).
* a local directory holding a saved diffusers pipeline (``save_pretrained`` output): ``from_pretrained(dir)``.
  Anything that starts with ``/``, ``.`` or ``~``, or that exists on disk, is read as a directory.

Whatever the source, the scheduler is rebuilt with the spec's serving overrides (e.g. trailing timestep
spacing for SDXL-Lightning), so a pipeline always runs the spec's steps the spec's way.

Each call builds a new pipeline: there is no cache shared between workers (diffusers pipelines are not
thread-safe; one pipeline belongs to one worker). Builds are safe from several threads at once: imports
and construction run one at a time under :data:`backends.building.BUILD_LOCK` (see :mod:`backends.building`
for what went wrong without it); moving the weights to the device does not wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffsim.errors import DiffsimError, InputError

from .building import BUILD_LOCK, import_model_libraries, seed_weights
from .specs import ModelSpec
from .tokenizer import byte_level_clip_tokenizer

RANDOM = "random"
HUB = "hub"


@dataclass(frozen=True)
class WeightsSource:
    kind: Literal["random", "hub", "local"]
    location: str  # "" for random, a hub id, or a directory path

    def describe(self) -> str:
        return self.kind if self.kind == RANDOM else f"{self.kind}:{self.location}"


def parse_weights(weights: str | Path, spec: ModelSpec) -> WeightsSource:
    """Read a ``--weights`` value for one model (see the module docstring for the rules)."""
    text = str(weights).strip()
    if not text:
        raise DiffsimError(f"empty weights source for model {spec.name}")
    if text == RANDOM:
        return WeightsSource(RANDOM, "")
    if text == HUB:
        return WeightsSource("hub", spec.hub_id)
    path = Path(text).expanduser()
    if path.exists() or text.startswith(("/", ".", "~")) or isinstance(weights, Path):
        if not path.is_dir():
            raise InputError(f"{path}: no such model directory (weights for {spec.name})")
        if not (path / "model_index.json").is_file():
            raise InputError(f"{path}: not a saved diffusers pipeline (no model_index.json) for {spec.name}")
        return WeightsSource("local", str(path))
    if text.count("/") == 1 and all(text.split("/")):
        return WeightsSource("hub", text)
    raise DiffsimError(
        f"weights {text!r} for {spec.name}: expected 'random', 'hub', a hub id owner/name or a pipeline directory"
    )


def _torch_dtype(dtype):
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype, dtype)


def pipeline_class(spec: ModelSpec):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if spec.family == "sdxl" else StableDiffusionPipeline


def scheduler_for(spec: ModelSpec, base_config: dict | None = None):
    """The spec's scheduler class from ``base_config`` (the weights' own) or the spec's defaults, with the
    spec's serving overrides on top."""
    import diffusers

    cls = getattr(diffusers, spec.scheduler)
    config = dict(base_config) if base_config is not None else spec.scheduler_config()
    config.update(spec.scheduler_overrides)
    return cls.from_config(config)


def build_random_components(spec: ModelSpec, *, device="cpu", seed: int = 0) -> dict:
    """Every pipeline component from the spec's configs, with random weights seeded by (model, seed), built
    on ``device`` in fp32 (building on the GPU keeps the multi-GB UNets quick to initialise)."""
    import_model_libraries()
    with BUILD_LOCK:
        return _random_components(spec, device, seed)


def _random_components(spec: ModelSpec, device, seed: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTextModelWithProjection

    device = torch.device(device)
    # Construction draws from the global RNG; seed_weights below redraws every random parameter.
    with device:
        unet = UNet2DConditionModel(**spec.unet)
        vae_cls = AutoencoderTiny if spec.vae_kind == "tiny" else AutoencoderKL
        vae = vae_cls(**spec.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
        if spec.family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
        elif spec.safety_checker is not None:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            sc = spec.safety_checker
            parts["safety_checker"] = StableDiffusionSafetyChecker(
                CLIPConfig(vision_config=sc["vision"], projection_dim=sc["projection_dim"])
            )
    for part, module in parts.items():
        seed_weights(module, f"{spec.name}/{part}", seed)
        module.eval()
    parts["tokenizer"] = byte_level_clip_tokenizer()
    parts["scheduler"] = scheduler_for(spec)
    if spec.family == "sdxl":
        parts["tokenizer_2"] = byte_level_clip_tokenizer()
    else:
        if spec.safety_checker is not None:
            size = spec.safety_checker["vision"]["image_size"]
            parts["feature_extractor"] = CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        else:
            parts.setdefault("safety_checker", None)
            parts["feature_extractor"] = None
    return parts


def build_pipeline(spec: ModelSpec, weights: str | Path | WeightsSource = RANDOM, *, device="cpu",
                   dtype="fp32", seed: int = 0):
    """A ready pipeline (on ``device``, in ``dtype``, progress bar off) for ``spec`` from ``weights``."""
    import torch

    source = weights if isinstance(weights, WeightsSource) else parse_weights(weights, spec)
    torch_dtype = _torch_dtype(dtype)
    import_model_libraries()
    with BUILD_LOCK:  # one build at a time in the process: see backends.building
        cls = pipeline_class(spec)
        if source.kind == RANDOM:
            parts = build_random_components(spec, device=device, seed=seed)
            for part in parts.values():
                if isinstance(part, torch.nn.Module):
                    part.to(dtype=torch_dtype)
            extra = {} if spec.family == "sdxl" else {"requires_safety_checker": parts["safety_checker"] is not None}
            if spec.family == "sdxl":
                extra["add_watermarker"] = False
            pipe = cls(**parts, **extra)
        else:
            pipe = _load_pretrained(cls, spec, source, torch_dtype)
        pipe.scheduler = scheduler_for(spec, dict(pipe.scheduler.config))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_pretrained(cls, spec: ModelSpec, source: WeightsSource, torch_dtype):
    """The real ``from_pretrained`` path, for a local directory or a hub id."""
    kwargs = {"dtype": torch_dtype}
    if spec.family == "sdxl":
        kwargs["add_watermarker"] = False
    try:
        pipe = cls.from_pretrained(source.location, **kwargs)
        if source.kind == "hub" and spec.unet_weights_file is not None:
            _load_unet_file(pipe, *spec.unet_weights_file)
    except DiffsimError:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, ... for bad sources
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = source.location
        raise InputError(f"{where}: cannot load {spec.name} ({source.kind}): {first}") from None
    return pipe


def _load_unet_file(pipe, repo: str, filename: str) -> None:
    """Load a UNet state dict from a hub file onto the pipeline's UNet (SDXL-Lightning's recipe)."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    state = load_file(hf_hub_download(repo, filename))
    pipe.unet.load_state_dict(state)
