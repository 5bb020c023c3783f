"""Image features for FID/KID (Inception-v3) and the CLIP score (torch; import only when needed).

Inception-v3 is torchvision's network with its weights read from a local safetensors file (no hub, no
pickle). Features are taken after the global average pool (2048-d, the standard for FID) or, for small samples,
from earlier layers averaged over space: 64-d (first max pool), 192-d (second max pool), 768-d (Mixed_6e).
Images are resized to 299x299 (bilinear, whole image, no crop) and scaled to [-1, 1], the input range of
the Google Inception weights. Absolute FIDs depend on the weights: the published FIDs use the TF-ported
"FID Inception" weights and its slightly different blocks, so numbers from torchvision's ImageNet weights are
comparable with each other, not with papers. The extractor's ``name`` (layer + weights hash) is stored with
reference statistics so that statistics from different extractors are never compared.

CLIP score (Hessel et al. 2021, as in torchmetrics): ``100 * max(cos(image embedding, text embedding), 0)``
per image-prompt pair, from a local ``transformers`` CLIPModel directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DiffsimError, InputError
from .images import open_image

# feature dimension -> torchvision Inception3 module whose output (averaged over space) is the feature
INCEPTION_LAYERS = {64: "maxpool1", 192: "maxpool2", 768: "Mixed_6e", 2048: "avgpool"}
INCEPTION_INPUT_SIZE = 299
IGNORED_INCEPTION_KEYS = ("fc.", "AuxLogits.")  # the classifier heads, unused for features


def file_digest(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class InceptionFeatures:
    """Inception-v3 pool features of PIL images as float64 numpy arrays."""

    def __init__(self, weights: Optional[str | Path], *, dim: int = 2048, device: str = "cpu",
                 input_size: int = INCEPTION_INPUT_SIZE, batch_size: int = 32):
        import torch
        import torchvision

        if dim not in INCEPTION_LAYERS:
            raise DiffsimError(f"Inception feature dimension must be one of {sorted(INCEPTION_LAYERS)}, got {dim}")
        if input_size < 75:
            raise DiffsimError(f"Inception input size must be >= 75 px, got {input_size}")
        self.dim, self.input_size, self.batch_size = dim, input_size, batch_size
        self.device = torch.device(device)
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                                transform_input=False)
        model.fc = torch.nn.Identity()
        if weights is None:  # tests and profiling only: the features of a random network mean little
            self.name = f"inception_v3/{INCEPTION_LAYERS[dim]}/random"
        else:
            weights = Path(weights)
            _load_inception_weights(model, weights)
            self.name = f"inception_v3/{INCEPTION_LAYERS[dim]}/sha256:{file_digest(weights)}"
        self.model = model.to(self.device).eval()
        self._captured: list = []
        layer = getattr(self.model, INCEPTION_LAYERS[dim])
        layer.register_forward_hook(lambda _m, _i, out: self._captured.append(out))

    def features_of_batch(self, images: list) -> np.ndarray:
        import torch
        from torchvision.transforms import functional as F

        x = torch.stack([
            F.to_tensor(im.convert("RGB").resize((self.input_size, self.input_size), resample=2))  # 2 = bilinear
            for im in images
        ]) * 2.0 - 1.0
        self._captured.clear()
        with torch.inference_mode():
            self.model(x.to(self.device))
        out = self._captured[0]
        self._captured.clear()
        return out.float().mean(dim=(2, 3)).cpu().double().numpy()

    def features(self, images: list) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim))
        return np.concatenate([self.features_of_batch(images[i:i + self.batch_size])
                               for i in range(0, len(images), self.batch_size)])

    def features_of_files(self, paths: list[Path], *, progress: bool = False) -> np.ndarray:
        """Decode and featurise files one batch at a time (so large folders need not fit in memory)."""
        from tqdm import tqdm

        chunks = []
        for i in tqdm(range(0, len(paths), self.batch_size), desc="features", unit="batch", disable=not progress,
                      leave=False):
            chunks.append(self.features_of_batch([open_image(p) for p in paths[i:i + self.batch_size]]))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim))


def _load_inception_weights(model, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise InputError(f"{path}: no such Inception weights file")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable safetensors file ({reason})") from None
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_INCEPTION_KEYS)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(IGNORED_INCEPTION_KEYS)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        first = (missing or unexpected or mismatched)[0]
        raise InputError(f"{path}: not torchvision Inception-v3 weights ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys; e.g. {first})")
    model.load_state_dict(state, strict=False)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a random-weight Inception-v3 in the format ``--inception-weights`` expects (for tests)."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


class ClipScorer:
    """CLIP score of (image, prompt) pairs with a local transformers CLIP directory."""

    def __init__(self, clip_dir: str | Path, *, device: str = "cpu", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        clip_dir = Path(clip_dir)
        if not clip_dir.is_dir():
            raise InputError(f"{clip_dir}: no such CLIP model directory")
        try:
            self.model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{clip_dir}: not a loadable CLIP model directory ({reason})") from None
        self.device, self.batch_size = device, batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def scores(self, images: list, prompts: list[str]) -> np.ndarray:
        """Per pair: 100 * max(cosine similarity, 0)."""
        import torch

        if len(images) != len(prompts):
            raise DiffsimError(f"CLIP score needs one prompt per image ({len(images)} images, {len(prompts)} prompts)")
        out = []
        for i in range(0, len(images), self.batch_size):
            inputs = self.processor(text=list(prompts[i:i + self.batch_size]),
                                    images=[im.convert("RGB") for im in images[i:i + self.batch_size]],
                                    return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                result = self.model(**inputs)
            img = torch.nn.functional.normalize(result.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(result.text_embeds.float(), dim=-1)
            out.append((100.0 * (img * txt).sum(-1).clamp(min=0)).cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

