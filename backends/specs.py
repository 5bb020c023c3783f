"""The five models of the three DiffServe cascades, as typed specs: serving settings plus architectures.

Serving settings follow the DiffServe artifact (shared/reference/diffserve_artifact.yaml and the notes in
shared/reference/h100/README.md, which read the artifact's ``src/worker/model.py``):

==============  =======================================================  =====  ========  ==========  ================
name            weights on the hub (fp16: its fp16 variant files)        steps  guidance  resolution  scheduler
==============  =======================================================  =====  ========  ==========  ================
sd-turbo        stabilityai/sd-turbo (fp16)                              1      0         512         Euler, trailing
sdxs            IDKiro/sdxs-512-0.9 (tiny VAE, TAESD)                    1      0         512         Euler, trailing
sd-v1.5         stable-diffusion-v1-5/stable-diffusion-v1-5 (fp16)       50     7.5       512         PNDM (see below)
sdxl-lightning  SDXL base (fp16) + ByteDance/SDXL-Lightning 2-step UNet  2      0         1024        Euler, trailing
sdxl            stabilityai/stable-diffusion-xl-base-1.0 (fp16)          50     5.0       1024        Euler, leading
==============  =======================================================  =====  ========  ==========  ================

Hub ids: SD v1.5's original repo (``runwayml/stable-diffusion-v1-5``) was taken down; the maintained
copy is ``stable-diffusion-v1-5/stable-diffusion-v1-5``. ``hub_variant="fp16"`` marks repos
that ship ``*.fp16.safetensors`` files (their model cards load them with ``variant="fp16"``): half the
bytes of the fp32 files, and what the ``cuda`` backend runs anyway. Asking diffusers for a variant a repo
lacks is an error (``variant_compatible_siblings`` raises "no such modeling files"), so SDXS, whose file
list could not be checked from here, downloads its default files.

SD v1.5: the artifact asks for DDIM but never applies it, so it really runs the pipeline's default PNDM
(50 steps = 51 UNet calls); we do the same. Guidance > 1 means classifier-free guidance (UNet batch 2b).
Both SDXL pipelines decode in fp32 (the VAE config's ``force_upcast``). fp16 on CUDA.

Architectures (``random`` weights are built from these configs alone; parameter counts match the H100
reference's, checked by the tests): SD v1.5 = UNet [320,640,1280,1280] + CLIP ViT-L/14 text + KL VAE +
CLIP ViT-L/14 safety checker; SD-Turbo = SD 2.1 UNet + OpenCLIP ViT-H text; SDXS = the reference's
*reconstruction* of SDXS-512-0.9 (3 levels, 1 resnet per down level, no mid block, cross-attention only
at the top level) + OpenCLIP ViT-H text + TAESD; SDXL / SDXL-Lightning = SDXL UNet + CLIP-L + OpenCLIP
bigG (with projection). The SD-Turbo/SDXS scheduler with one trailing step runs the UNet at t=999.

Each model also has a ``tiny`` variant (same block types and flags, a few M parameters, 64x64 images)
for the ``cpu-tiny`` backend and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from diffsim.errors import DiffsimError

MODEL_NAMES = ("sd-turbo", "sdxs", "sd-v1.5", "sdxl-lightning", "sdxl")
SIZES = ("full", "tiny")

Family = Literal["sd", "sdxl"]
VaeKind = Literal["kl", "tiny"]


@dataclass(frozen=True)
class ModelSpec:
    """One model: how it is served (steps, guidance, resolution, scheduler) and how it is built."""

    name: str
    size: str  # "full" or "tiny"
    family: Family  # "sd" -> StableDiffusionPipeline, "sdxl" -> StableDiffusionXLPipeline
    hub_id: str
    steps: int
    guidance_scale: float
    resolution: int
    scheduler: str  # a diffusers scheduler class name
    scheduler_overrides: dict[str, Any]  # applied to whatever scheduler config the weights bring
    unet: dict[str, Any]
    vae_kind: VaeKind
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # CLIPTextConfig kwargs
    text_encoder_2: Optional[dict[str, Any]] = None  # SDXL's second encoder (CLIPTextModelWithProjection)
    safety_checker: Optional[dict[str, Any]] = None  # {"vision": CLIPVisionConfig kwargs, "projection_dim": n}
    # The hub repo's weights variant ("fp16": *.fp16.safetensors files) or None (its default files).
    hub_variant: Optional[str] = None
    # SDXL-Lightning: (hub repo, file) of the UNet state dict that replaces the base pipeline's UNet.
    unet_weights_file: Optional[tuple[str, str]] = None
    notes: str = ""
    # The architecture-independent scheduler settings (Stable Diffusion's training noise schedule).
    scheduler_base: dict[str, Any] = field(
        default_factory=lambda: {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "steps_offset": 1,
        }
    )

    @property
    def cfg(self) -> bool:
        """Whether the pipeline runs classifier-free guidance (UNet batch 2b)."""
        return self.guidance_scale > 1.0

    @property
    def vae_scale_factor(self) -> int:
        if self.vae_kind == "tiny":
            return 2 ** (len(self.vae["decoder_block_out_channels"]) - 1)
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config used with ``random`` weights."""
        return {**self.scheduler_base, **self.scheduler_overrides}

    def check(self) -> None:
        """Raise DiffsimError when the parts do not fit together (dimensions that must agree)."""
        unet = self.unet
        te_dim = self.text_encoder["hidden_size"]
        if self.text_encoder_2 is not None:
            te_dim += self.text_encoder_2["hidden_size"]
        problems = []
        if unet["cross_attention_dim"] != te_dim:
            problems.append(f"UNet cross_attention_dim {unet['cross_attention_dim']} != text width {te_dim}")
        latent_channels = self.vae["latent_channels"]
        if unet["in_channels"] != latent_channels or unet["out_channels"] != latent_channels:
            problems.append("UNet in/out channels differ from the VAE's latent channels")
        if self.resolution % self.vae_scale_factor:
            problems.append(f"resolution {self.resolution} is not a multiple of the VAE factor")
        downsamples = 2 ** (len(unet["block_out_channels"]) - 1)
        if self.latent_size % downsamples:
            problems.append(f"latent size {self.latent_size} is not a multiple of the UNet's {downsamples}")
        if unet["sample_size"] != self.latent_size:
            problems.append(f"UNet sample_size {unet['sample_size']} != latent size {self.latent_size}")
        if self.family == "sdxl":
            if self.text_encoder_2 is None:
                problems.append("an SDXL model needs text_encoder_2")
            else:
                expected = 6 * unet["addition_time_embed_dim"] + self.text_encoder_2["projection_dim"]
                if unet.get("projection_class_embeddings_input_dim") != expected:
                    problems.append(f"projection_class_embeddings_input_dim should be {expected}")
        if problems:
            raise DiffsimError(f"model spec {self.name} ({self.size}): " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Architecture builders. Full and tiny variants call the same builder with different widths, so a tiny
# model keeps its full model's block types and flags.


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int) -> dict:
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def _sd_unet(
    channels: list[int],
    heads: Any,
    cross_dim: int,
    latent: int,
    *,
    linear_projection: bool,
    layers: int = 2,
    groups: int = 32,
) -> dict:
    """An SD 1.x/2.x UNet: cross-attention on every level but the lowest, which is a plain ResNet level."""
    n = len(channels)
    return {
        "sample_size": latent,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear_projection,
    }


def _sdxs_unet(channels: list[int], heads: list[int], cross_dim: int, latent: int, *, groups: int = 32) -> dict:
    """SDXS-512-0.9 as reconstructed in the H100 reference: cross-attention on every level, one ResNet per
    down level (two per up level), no mid block, self-attention replaced by cross-attention at the top level."""
    n = len(channels)
    return {
        "sample_size": latent,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * n,
        "up_block_types": ["CrossAttnUpBlock2D"] * n,
        "mid_block_type": None,
        "only_cross_attention": [True] + [False] * (n - 1),
        "block_out_channels": channels,
        "layers_per_block": 1,
        "norm_num_groups": groups,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": True,
    }


def _sdxl_unet(
    channels: list[int],
    heads: list[int],
    depth: list[int],
    cross_dim: int,
    latent: int,
    time_dim: int,
    pooled_dim: int,
    *,
    groups: int = 32,
) -> dict:
    """The SDXL UNet: a plain top level, then cross-attention levels with deep transformers, text_time
    added conditioning (pooled text embedding + 6 size/crop numbers)."""
    n = len(channels)
    return {
        "sample_size": latent,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        "block_out_channels": channels,
        "layers_per_block": 2,
        "norm_num_groups": groups,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "cross_attention_dim": cross_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + pooled_dim,
    }


def _kl_vae(channels: list[int], resolution: int, scaling: float, *, upcast: bool, layers: int = 2,
            groups: int = 32) -> dict:
    n = len(channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "latent_channels": 4,
        "sample_size": resolution,
        "scaling_factor": scaling,
        "force_upcast": upcast,
    }


def _tiny_vae(channels: int, blocks_enc: list[int], blocks_dec: list[int]) -> dict:
    """TAESD (AutoencoderTiny). The full model uses diffusers' defaults: 64 channels, (1,3,3,3) / (3,3,3,1)."""
    n = len(blocks_enc)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "encoder_block_out_channels": [channels] * n,
        "decoder_block_out_channels": [channels] * n,
        "num_encoder_blocks": blocks_enc,
        "num_decoder_blocks": blocks_dec,
        "latent_channels": 4,
        "scaling_factor": 1.0,
    }


def _safety_checker(hidden: int, layers: int, heads: int, intermediate: int, image: int, patch: int,
                    projection: int) -> dict:
    return {
        "vision": {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": image,
            "patch_size": patch,
            "hidden_act": "quick_gelu",
            "projection_dim": projection,
        },
        "projection_dim": projection,
    }


_TRAILING = {"timestep_spacing": "trailing"}
_LEADING = {"timestep_spacing": "leading"}
_PNDM = {"skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False}


def _specs(size: str) -> dict[str, ModelSpec]:
    full = size == "full"
    res_sd = 512 if full else 64
    res_xl = 1024 if full else 64
    if full:
        clip_l = _clip_text(768, 12, 12, 3072, "quick_gelu", 768)
        clip_h = _clip_text(1024, 23, 16, 4096, "gelu", 512)
        clip_bigg = _clip_text(1280, 32, 20, 5120, "gelu", 1280)
        vae_sd = _kl_vae([128, 256, 512, 512], res_sd, 0.18215, upcast=False)
        vae_xl = _kl_vae([128, 256, 512, 512], res_xl, 0.13025, upcast=True)
        taesd = _tiny_vae(64, [1, 3, 3, 3], [3, 3, 3, 1])
        sd15_unet = _sd_unet([320, 640, 1280, 1280], 8, 768, 64, linear_projection=False)
        sd21_unet = _sd_unet([320, 640, 1280, 1280], [5, 10, 20, 20], 1024, 64, linear_projection=True)
        sdxs_unet = _sdxs_unet([320, 640, 1280], [5, 10, 20], 1024, 64)
        sdxl_unet = _sdxl_unet([320, 640, 1280], [5, 10, 20], [1, 2, 10], 2048, 128, 256, 1280)
        safety = _safety_checker(1024, 24, 16, 4096, 224, 14, 768)
    else:
        clip_l = _clip_text(32, 2, 4, 64, "quick_gelu", 32)
        clip_h = _clip_text(32, 2, 4, 64, "gelu", 16)
        clip_bigg = _clip_text(32, 2, 4, 64, "gelu", 32)
        vae_sd = _kl_vae([16, 16, 16, 16], res_sd, 0.18215, upcast=False, layers=1, groups=8)
        vae_xl = _kl_vae([16, 16, 16, 16], res_xl, 0.13025, upcast=True, layers=1, groups=8)
        taesd = _tiny_vae(16, [1, 1, 1, 1], [1, 1, 1, 1])
        sd15_unet = _sd_unet([32, 64], 8, 32, 8, linear_projection=False, layers=1)
        sd21_unet = _sd_unet([32, 64], [2, 4], 32, 8, linear_projection=True, layers=1)
        sdxs_unet = _sdxs_unet([16, 32, 32], [2, 4, 4], 32, 8, groups=8)
        sdxl_unet = _sdxl_unet([32, 64], [2, 4], [1, 2], 64, 8, 8, 32)
        safety = _safety_checker(32, 2, 4, 64, 32, 8, 16)

    specs = [
        ModelSpec(
            name="sd-turbo", size=size, family="sd", hub_id="stabilityai/sd-turbo", hub_variant="fp16",
            steps=1, guidance_scale=0.0, resolution=res_sd,
            scheduler="EulerDiscreteScheduler", scheduler_overrides=dict(_TRAILING),
            unet=sd21_unet, vae_kind="kl", vae=vae_sd, text_encoder=clip_h,
            notes="SD 2.1 architecture (OpenCLIP ViT-H text encoder) distilled to one step",
        ),
        ModelSpec(
            name="sdxs", size=size, family="sd", hub_id="IDKiro/sdxs-512-0.9",
            steps=1, guidance_scale=0.0, resolution=res_sd,
            scheduler="EulerDiscreteScheduler", scheduler_overrides=dict(_TRAILING),
            unet=sdxs_unet, vae_kind="tiny", vae=taesd, text_encoder=clip_h,
            notes="UNet reconstructed (no public config); the released model's scheduler is not verified",
        ),
        ModelSpec(
            name="sd-v1.5", size=size, family="sd", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            hub_variant="fp16",
            steps=50, guidance_scale=7.5, resolution=res_sd,
            scheduler="PNDMScheduler", scheduler_overrides=dict(_PNDM),
            unet=sd15_unet, vae_kind="kl", vae=vae_sd, text_encoder=clip_l, safety_checker=safety,
            notes="PNDM, as the DiffServe artifact actually runs it (its DDIM option is never applied)",
        ),
        ModelSpec(
            name="sdxl-lightning", size=size, family="sdxl", hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            hub_variant="fp16",
            steps=2, guidance_scale=0.0, resolution=res_xl,
            scheduler="EulerDiscreteScheduler", scheduler_overrides=dict(_TRAILING),
            unet=sdxl_unet, vae_kind="kl", vae=vae_xl, text_encoder=clip_l, text_encoder_2=clip_bigg,
            unet_weights_file=("ByteDance/SDXL-Lightning", "sdxl_lightning_2step_unet.safetensors"),
            notes="the 2-step SDXL-Lightning UNet on the SDXL base pipeline",
        ),
        ModelSpec(
            name="sdxl", size=size, family="sdxl", hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            hub_variant="fp16",
            steps=50, guidance_scale=5.0, resolution=res_xl,
            scheduler="EulerDiscreteScheduler", scheduler_overrides=dict(_LEADING),
            unet=sdxl_unet, vae_kind="kl", vae=vae_xl, text_encoder=clip_l, text_encoder_2=clip_bigg,
        ),
    ]
    return {s.name: s for s in specs}


def get_spec(name: str, size: str = "full") -> ModelSpec:
    """The spec of model ``name`` (one of MODEL_NAMES) in ``size`` "full" or "tiny". A fresh object each call."""
    if size not in SIZES:
        raise DiffsimError(f"unknown model size {size!r} (known: {', '.join(SIZES)})")
    specs = _specs(size)
    if name not in specs:
        raise DiffsimError(f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
    spec = specs[name]
    spec.check()
    return spec
