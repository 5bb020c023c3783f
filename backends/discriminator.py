"""The cascade's discriminator: a timm EfficientNet with a 2-class head that scores generated images.

Class 1 is *real*, class 0 is *generated*; an image's confidence is P(real) = softmax(logits)[1]. A prompt
whose light-model image scores below the plan's threshold is deferred to the heavy model.

The default architecture is ``efficientnetv2_s``: the DiffServe artifact used torchvision's EfficientNet-V2-S
on 224x224 inputs, and timm's ``efficientnetv2_s`` is the same network (PyTorch-style padding), so the
latency profiles measured for it apply. Any timm EfficientNet name can be given instead.

Weights are read only from safetensors files (never unpickled). A settings file ``FILE.json`` beside
``FILE.safetensors`` (written by ``diffsim discriminator train``) gives the architecture, input size and
normalisation the weights were trained with.

Normalisation, where no settings file says otherwise, is the one timm's pretrained weights of the
architecture were trained with (:func:`normalisation`: the ``mean``/``std`` of its default pretrained
config), not ImageNet's for every architecture: the recommended starting weights for fine-tuning,
``tf_efficientnetv2_s.in1k``, expect inputs scaled to [-1, 1] (mean = std = 0.5), and fed ImageNet-normalised
inputs they start from features computed on inputs of the wrong scale.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffsim.errors import DiffsimError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image
    import torch

DEFAULT_ARCH = "efficientnetv2_s"
DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REAL_CLASS = 1
GENERATED_CLASS = 0
CLASS_NAMES = {GENERATED_CLASS: "generated", REAL_CLASS: "real"}
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class DiscriminatorSettings:
    """What is needed to rebuild and feed a discriminator: stored as ``FILE.json`` beside its weights."""

    arch: str = DEFAULT_ARCH
    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    real_class: int = REAL_CLASS
    # Anything else the file holds (training metrics, counts, seed) is kept here, untouched.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["classes"] = {str(k): v for k, v in CLASS_NAMES.items()}
        return {**d, **extra}


def normalisation(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) of the inputs timm's pretrained weights for ``arch`` expect -- its default pretrained
    config's (``timm.models.get_pretrained_cfg``): 0.5 / 0.5 for ``tf_efficientnetv2_s``, ImageNet's for
    ``efficientnet_b0``. ImageNet's when timm has no such config or it is not a 3-channel one."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def default_settings(arch: str, image_size: int = DEFAULT_IMAGE_SIZE) -> DiscriminatorSettings:
    """Settings for ``arch`` when no settings file gives them: its timm normalisation (:func:`normalisation`)."""
    mean, std = normalisation(arch)
    return DiscriminatorSettings(arch=arch, image_size=image_size, mean=mean, std=std)


def settings_path(weights: str | Path) -> Path:
    """``disc.safetensors`` -> ``disc.json``."""
    return Path(weights).with_suffix(".json")


def read_settings(path: str | Path) -> DiscriminatorSettings:
    """Parse a settings JSON file, raising a one-line InputError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read settings file ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of discriminator settings")
    known = {"arch", "image_size", "mean", "std", "real_class"}
    try:
        arch = data.get("arch", DEFAULT_ARCH)
        if not isinstance(arch, str) or not arch:
            raise ValueError("arch: expected a timm model name")
        image_size = data.get("image_size", DEFAULT_IMAGE_SIZE)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError("image_size: expected an integer >= 8")
        default_mean, default_std = normalisation(arch)
        mean = _triple(data.get("mean", default_mean), "mean")
        std = _triple(data.get("std", default_std), "std")
        if min(std) <= 0:
            raise ValueError("std: values must be > 0")
        real_class = data.get("real_class", REAL_CLASS)
        if real_class not in (0, 1) or isinstance(real_class, bool):
            raise ValueError("real_class: expected 0 or 1")
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    extra = {k: v for k, v in data.items() if k not in known and k != "classes"}
    return DiscriminatorSettings(arch, image_size, mean, std, real_class, extra)


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{name}: expected a list of 3 numbers")
    try:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a list of 3 numbers") from None


def check_arch(arch: str) -> None:
    """Accept any timm EfficientNet (v1, v2, lite, tf_ ports, the tiny test net)."""
    import timm

    if "efficientnet" not in arch or arch not in timm.list_models(arch):
        examples = "efficientnetv2_s, efficientnet_b0, tf_efficientnetv2_b0, test_efficientnet"
        raise DiffsimError(f"unknown discriminator arch {arch!r}: give a timm EfficientNet name (e.g. {examples})")


def create_model(arch: str) -> "torch.nn.Module":
    """A timm EfficientNet with a fresh 2-class head; never fetches pretrained weights."""
    import timm

    check_arch(arch)
    return timm.create_model(arch, pretrained=False, num_classes=2)


def load_weights_file(path: str | Path) -> dict[str, "torch.Tensor"]:
    """Read a state dict from a safetensors file (no pickle), one-line errors naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such weights file")
    if not path.is_file():
        raise InputError(f"{path}: weights path is not a file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable safetensors file ({first})") from None


def load_state_into(model: "torch.nn.Module", state: dict, path: str | Path, arch: str) -> None:
    """Strictly load ``state`` into ``model``; any missing/unexpected/mis-shaped key is a one-line error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} "
                f"vs model {tuple(own[k].shape)})"
            )
        raise InputError(
            f"{path}: weights do not fit a 2-class {arch!r} discriminator: {'; '.join(parts)} "
            f"(wrong --arch, or not a discriminator checkpoint?)"
        )
    model.load_state_dict(state, strict=True)


class Discriminator:
    """Scores PIL images: P(real) per image. Preprocessing: resize the short side, centre crop, normalise."""

    def __init__(self, model: "torch.nn.Module", settings: DiscriminatorSettings, *, device: str = "cpu",
                 dtype: "torch.dtype | None" = None, weights: Path | None = None):
        import torch

        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.weights = weights
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self._transform = eval_transform(settings)

    @property
    def arch(self) -> str:
        return self.settings.arch

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    def preprocess(self, images: list["PIL.Image.Image"]) -> "torch.Tensor":
        """A float batch (N, 3, S, S) on the CPU, ready for ``logits``."""
        import torch

        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def logits(self, batch: "torch.Tensor") -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            return self.model(batch.to(device=self.device, dtype=self.dtype)).float()

    def score(self, images: list["PIL.Image.Image"]) -> np.ndarray:
        """P(real) per image as float64 in [0, 1], in the order given."""
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        return self.score_tensor(self.preprocess(images))

    def score_tensor(self, batch: "torch.Tensor") -> np.ndarray:
        """P(real) for an already preprocessed batch."""
        import torch

        probs = torch.softmax(self.logits(batch), dim=1)[:, self.settings.real_class]
        return probs.cpu().double().numpy().clip(0.0, 1.0)


def eval_transform(settings: DiscriminatorSettings):
    """Resize the short side to ``image_size``, centre-crop a square, ToTensor, normalise (no distortion)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(settings.image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(settings.image_size),
        T.ToTensor(),
        T.Normalize(settings.mean, settings.std),
    ])


def _parse_dtype(dtype: Any) -> "torch.dtype | None":
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if str(dtype).lower() not in names:
        raise DiffsimError(f"unknown discriminator dtype {dtype!r}: use one of {', '.join(names)}")
    return names[str(dtype).lower()]


def build_discriminator(arch: str | None = None, *, weights: str | Path | None = None, device: str = "cpu",
                        dtype=None, image_size: int | None = None,
                        pretrained_random_ok: bool = True) -> Discriminator:
    """Build a discriminator from a safetensors file, or with random weights when ``weights`` is None.

    With weights, ``FILE.json`` beside them (when present) supplies arch, image size and normalisation;
    an explicit ``arch`` that contradicts it is an error, an explicit ``image_size`` overrides it. Without
    that file the normalisation is the architecture's timm one (:func:`normalisation`).
    Random weights (for profiling and tests) are seeded from (arch, :data:`RANDOM_INIT_SEED`) with private
    generators (:func:`backends.building.seed_weights`), so two builds give the same network, even when
    workers build at the same time; pass ``pretrained_random_ok=False`` to refuse them where scores must
    mean something. Model construction runs under :data:`backends.building.BUILD_LOCK`.
    """
    from .building import BUILD_LOCK, seed_weights

    torch_dtype = _parse_dtype(dtype)
    if weights is None:
        if not pretrained_random_ok:
            raise DiffsimError("no discriminator weights given: pass a .safetensors file "
                               "(random weights give meaningless confidences)")
        settings = default_settings(arch or DEFAULT_ARCH)
        with BUILD_LOCK:
            model = seed_weights(create_model(settings.arch), f"discriminator/{settings.arch}", RANDOM_INIT_SEED)
        weights_path = None
    else:
        weights_path = Path(weights)
        sidecar = settings_path(weights_path)
        if weights_path.exists() and sidecar.exists() and sidecar != weights_path:
            settings = read_settings(sidecar)
            if arch is not None and arch != settings.arch:
                raise InputError(f"{sidecar}: arch is {settings.arch!r} but {arch!r} was requested")
        else:
            settings = default_settings(arch or DEFAULT_ARCH)
        state = load_weights_file(weights_path)
        with BUILD_LOCK:
            model = create_model(settings.arch)
        load_state_into(model, state, weights_path, settings.arch)
    if image_size is not None:
        if image_size < 8:
            raise DiffsimError(f"discriminator image size must be >= 8 px, got {image_size}")
        settings = DiscriminatorSettings(settings.arch, int(image_size), settings.mean, settings.std,
                                         settings.real_class, settings.extra)
    return Discriminator(model, settings, device=device, dtype=torch_dtype, weights=weights_path)
