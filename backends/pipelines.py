"""Build one diffusers pipeline from a :class:`~backends.specs.ModelSpec` and a weights source.

A weights source is one of:

* ``random`` -- every component built from the spec's configs with seeded random weights (no download;
  latency does not depend on weight values). The tokenizer is the byte-level one of
  :mod:`backends.tokenizer`. The same (model, seed) gives the same weights in every worker, process and
  restart: they come from private generators (:func:`backends.building.seed_weights`), never from the
  global torch RNG, which another worker building at the same time would also draw from.
* ``hub`` -- the spec's own hub id (its fp16 variant files where the repo has them, see
  :mod:`backends.specs`); or an explicit hub id ``owner/name`` (its default files): the real
  ``from_pretrained`` path (it needs the model hub, which the build machines cannot reach).
* a local directory holding a saved diffusers pipeline (``save_pretrained`` output): ``from_pretrained(dir)``
  (with ``variant="fp16"`` when the directory holds ``*.fp16.*`` weight files, which diffusers reads only
  when asked for that variant). Anything that starts with ``/``, ``.`` or ``~``, or that exists on disk, is
  read as a directory.

SDXL-Lightning is the SDXL base pipeline with another UNet, and that UNet is loaded from every source
(before, only hub sources got it, and a local directory silently ran the base UNet in 2 steps: blurry
images). From the hub: ``ByteDance/SDXL-Lightning``'s file; from a directory: the same file inside it (or
inside its ``unet/``), else the load is refused. The UNet is built from the base's UNet config on the meta
device, filled with the file's weights and handed to ``from_pretrained(unet=...)``, so the base UNet's
5 GB are neither downloaded nor read only to be overwritten.

Whatever the source, the scheduler is rebuilt with the spec's serving overrides as keyword arguments of
``from_config`` (see :func:`scheduler_for`), and a model of one or two steps must then start at a high
timestep (:func:`check_schedule`), so a pipeline always runs the spec's steps the spec's way.

SDXL-class pipelines (1024 px) decode one image at a time (``vae.enable_slicing()``): their VAE decodes in
fp32 (``force_upcast``), and a batch of 32 decoded at once would need ~110 GiB.

Each call builds a new pipeline: there is no cache shared between workers (diffusers pipelines are not
thread-safe; one pipeline belongs to one worker). Builds are safe from several threads at once: imports
and construction run one at a time under :data:`backends.building.BUILD_LOCK` (see :mod:`backends.building`
for what went wrong without it); moving the weights to the device does not wait for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from diffsim.errors import DiffsimError, InputError

from .building import BUILD_LOCK, cast_dtype, import_model_libraries, seed_weights
from .specs import ModelSpec
from .tokenizer import byte_level_clip_tokenizer

RANDOM = "random"
HUB = "hub"

# ``dtype=`` in ``from_pretrained`` arrived in diffusers 0.40 (earlier versions ignore it with a warning and
# load fp32); setup.cfg asks for the same floor.
MIN_DIFFUSERS = (0, 40)


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


def check_diffusers_version() -> None:
    """Refuse a diffusers older than :data:`MIN_DIFFUSERS`, which would load fp32 weights without a word."""
    import diffusers

    parts = []
    for piece in diffusers.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_DIFFUSERS:
        floor = ".".join(map(str, MIN_DIFFUSERS))
        raise DiffsimError(f"diffusers {diffusers.__version__} is too old: diffsim needs diffusers>={floor} "
                           f"(pip install -U 'diffusers>={floor}')")


def scheduler_for(spec: ModelSpec, base_config: dict | None = None):
    """The spec's scheduler class from ``base_config`` (the weights' own) or the spec's defaults, with the
    spec's serving overrides on top.

    The overrides go in as keyword arguments of ``from_config``, not merged into the config dict: a config
    read from disk lists in ``_use_default_values`` every key its file lacked, and diffusers'
    ``extract_init_dict`` drops those keys from the dict before building -- keyword arguments are applied
    after. Merged into the dict, an override of such a key (``timestep_spacing`` for every scheduler file
    that does not name it) was silently lost: SD-Turbo then ran its one step at t=0 (a noise image),
    SDXL-Lightning at [999, 0], SD v1.5's PNDM with its Runge-Kutta warm-up steps.
    """
    import diffusers

    cls = getattr(diffusers, spec.scheduler)
    config = dict(base_config) if base_config is not None else dict(spec.scheduler_base)
    return cls.from_config(config, **spec.scheduler_overrides)


# A model of one or two steps must start from (almost) pure noise: its first timestep near the top.
HIGH_TIMESTEP_FRACTION = 0.9


def check_schedule(spec: ModelSpec, scheduler) -> None:
    """Raise DiffsimError when a one- or two-step model's first timestep is not in the top tenth of the
    training schedule: such a model denoises from pure noise in one jump, and a schedule that starts low
    (t=0 with ``linspace`` spacing for one step) returns noise or a blur without any error."""
    if spec.steps > 2:
        return
    probe = copy.deepcopy(scheduler)  # set_timesteps changes the scheduler's state
    probe.set_timesteps(spec.steps)
    first = float(probe.timesteps[0])
    top = int(probe.config.num_train_timesteps)
    if first < HIGH_TIMESTEP_FRACTION * top:
        spacing = probe.config.get("timestep_spacing")
        raise DiffsimError(f"{spec.name}: its {spec.steps}-step schedule starts at t={first:g} of {top} "
                           f"(timestep_spacing {spacing!r}); a distilled few-step model needs t near {top - 1}")


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
    check_diffusers_version()
    with BUILD_LOCK:  # one build at a time in the process: see backends.building
        cls = pipeline_class(spec)
        if source.kind == RANDOM:
            parts = build_random_components(spec, device=device, seed=seed)
            for part in parts.values():
                if isinstance(part, torch.nn.Module):
                    cast_dtype(part, torch_dtype)  # not .to(dtype=): see backends.building
            extra = {} if spec.family == "sdxl" else {"requires_safety_checker": parts["safety_checker"] is not None}
            if spec.family == "sdxl":
                extra["add_watermarker"] = False
            pipe = cls(**parts, **extra)
        else:
            pipe = _load_pretrained(cls, spec, source, torch_dtype)
        pipe.scheduler = scheduler_for(spec, dict(pipe.scheduler.config))
        check_schedule(spec, pipe.scheduler)
        if spec.resolution >= 1024 and hasattr(pipe.vae, "enable_slicing"):
            pipe.vae.enable_slicing()  # SDXL class: an fp32 decode per image, not per batch (module docstring)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights_variant(spec: ModelSpec, source: WeightsSource) -> Optional[str]:
    """The ``variant`` to ask ``from_pretrained`` for: the spec's for its own hub repo; ``"fp16"`` for a
    directory holding fp16 variant files (diffusers reads them only when asked, and refuses a variant a
    source lacks); None otherwise."""
    if source.kind == "hub":
        return spec.hub_variant if source.location == spec.hub_id else None
    if source.kind == "local":
        root = Path(source.location)
        # model.fp16.safetensors, diffusion_pytorch_model-00001-of-00002.fp16.safetensors, legacy *.fp16-0000*
        if any(root.glob("*/*.fp16.*")) or any(root.glob("*/*.fp16-*")):
            return "fp16"
    return None


def _load_pretrained(cls, spec: ModelSpec, source: WeightsSource, torch_dtype):
    """The real ``from_pretrained`` path, for a local directory or a hub id."""
    kwargs = {"dtype": torch_dtype}
    variant = weights_variant(spec, source)
    if variant is not None:
        kwargs["variant"] = variant
    if spec.family == "sdxl":
        kwargs["add_watermarker"] = False
    try:
        if spec.unet_weights_file is not None:
            kwargs["unet"] = _replacement_unet(spec, source, torch_dtype)
        pipe = cls.from_pretrained(source.location, **kwargs)
    except DiffsimError:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, ... for bad sources
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = source.location
        raise InputError(f"{where}: cannot load {spec.name} ({source.kind}): {first}") from None
    return pipe


def unet_weights_path(spec: ModelSpec, source: WeightsSource) -> Path:
    """Where the spec's replacement UNet file is: downloaded from its hub repo for a hub source; inside
    the directory (or its ``unet/``) for a local one -- refused when it is not there, since the
    directory's own UNet is the base model's (see the module docstring)."""
    repo, filename = spec.unet_weights_file
    if source.kind == "hub":
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    root = Path(source.location)
    for candidate in (root / filename, root / "unet" / filename):
        if candidate.is_file():
            return candidate
    raise InputError(f"{root}: {spec.name} needs its own UNet: put {filename} (from the hub repo {repo}) in "
                     f"this directory; without it the directory's UNet, SDXL base, would run {spec.steps} steps "
                     f"and make blurred images")


def _replacement_unet(spec: ModelSpec, source: WeightsSource, torch_dtype):
    """The spec's UNet: the source's UNet config (its ``unet/config.json`` only), built on the meta device
    (no memory, no random initialisation of 2.6 B parameters) and given the file's weights, every key
    (``strict``: a file for another architecture is an error, not a half-loaded UNet)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    weights_file = unet_weights_path(spec, source)
    config = UNet2DConditionModel.load_config(source.location, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict(load_file(str(weights_file)), strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{weights_file}: not a UNet for {spec.name}'s base ({first})") from None
    return cast_dtype(unet, torch_dtype).eval()
