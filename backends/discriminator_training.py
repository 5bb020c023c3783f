"""Training the discriminator: real images (class 1) against generated images (class 0).

One epoch = one pass over the training split with augmentation (random resized crop, horizontal flip);
after each epoch the held-out split (stratified by class, seeded) is scored without augmentation and its
accuracy and ROC-AUC reported. Runs are deterministic for a seed on the CPU: the RNGs are seeded,
deterministic algorithms are requested, and images are loaded in a fixed order by a seeded loader.

Defaults (``efficientnet_b0`` at 64 px, 10 epochs) are sized so that a few dozen images train in seconds on
a laptop CPU: enough to check the pipeline (from scratch, batch-norm statistics are re-estimated before each
validation, see :func:`recalibrate_batch_norm`). For a discriminator that means something, train on thousands
of real (e.g. MS-COCO) and generated images with an EfficientNet-V2-S (the paper's network) at serving
resolution, starting from ImageNet weights: ``--arch tf_efficientnetv2_s --init model.safetensors`` (timm's
``tf_efficientnetv2_s.in1k`` weights file; its 1000-class head is replaced by a fresh 2-class head)
``--image-size 224 --epochs 20 --lr 1e-4 --device cuda``.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from backends.discriminator import (
    CLASS_NAMES,
    GENERATED_CLASS,
    REAL_CLASS,
    DiscriminatorSettings,
    create_model,
    default_settings,
    eval_transform,
    load_state_into,
    load_weights_file,
    read_settings,
    settings_path,
)
from diffsim.errors import DiffsimError
from diffsim.quality.images import open_image, verify_images

DEFAULT_TRAIN_ARCH = "efficientnet_b0"
DEFAULT_TRAIN_IMAGE_SIZE = 64
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    arch: Optional[str] = None  # None: the --init file's arch, else DEFAULT_TRAIN_ARCH
    image_size: int = DEFAULT_TRAIN_IMAGE_SIZE
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    val_fraction: float = 0.2
    seed: int = 0
    init: Optional[Path] = None
    device: str = "cpu"
    workers: int = 0  # image-loading processes; 0 loads in the training process

    def validate(self) -> None:
        if self.epochs < 1:
            raise DiffsimError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise DiffsimError(f"--batch-size must be >= 2 (batch norm needs 2 samples), got {self.batch_size}")
        if self.image_size < 32:
            raise DiffsimError(f"--image-size must be >= 32 px, got {self.image_size}")
        if not (0.0 <= self.val_fraction < 1.0):
            raise DiffsimError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DiffsimError(f"--lr must be > 0, got {self.lr}")
        if self.workers < 0:
            raise DiffsimError(f"--workers must be >= 0, got {self.workers}")


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: Optional[float] = None
    val_accuracy: Optional[float] = None
    val_roc_auc: Optional[float] = None

    def line(self) -> str:
        s = f"epoch {self.epoch}: train loss {self.train_loss:.4f} acc {self.train_accuracy:.3f}"
        if self.val_accuracy is not None:
            s += f" | val loss {self.val_loss:.4f} acc {self.val_accuracy:.3f} roc-auc {_fmt(self.val_roc_auc)}"
        return s


@dataclass
class TrainResult:
    model: "object"  # torch.nn.Module
    settings: DiscriminatorSettings
    history: list[EpochMetrics]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve for positive label 1: the probability that a random positive scores above a
    random negative (ties count half), via the Mann-Whitney rank sum. NaN when a class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):  # average rank over each run of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): per class, a seeded shuffle and round(val_fraction * n) held out (at least one
    when val_fraction > 0, always leaving one to train on)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = 0
        if val_fraction > 0:
            n_val = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def train_transform(settings: DiscriminatorSettings):
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(settings.image_size, scale=(0.5, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(settings.mean, settings.std),
    ])


class _ImageDataset:
    """(tensor, label) per file; decodes on access so large folders need not fit in memory."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i])), int(self.labels[i])


def _init_model(arch: str, init: Optional[Path]) -> tuple["object", str]:
    """A fresh 2-class model, optionally starting from ``init``; returns (model, note about the init)."""
    model = create_model(arch)
    if init is None:
        return model, "random initialisation"
    state = load_weights_file(init)
    own = model.state_dict()
    head = [k for k in state if k.startswith("classifier.") and k in own and state[k].shape != own[k].shape]
    if head:  # e.g. an ImageNet checkpoint: keep its backbone, start a fresh 2-class head
        classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else "?"
        state = {**{k: v for k, v in state.items() if k not in head}, **{k: own[k] for k in head}}
        note = f"backbone from {init}, fresh 2-class head (the file's head had {classes} classes)"
    else:
        note = f"all weights from {init}"
    load_state_into(model, state, init, arch)
    return model, note


def _training_settings(config: TrainConfig) -> DiscriminatorSettings:
    """Architecture and normalisation to train with. An ``--init`` file with a settings file beside it (an
    earlier discriminator) brings its own arch and normalisation; otherwise the normalisation is the one
    timm's pretrained weights of the arch expect (:func:`backends.discriminator.normalisation`), since
    an ``--init`` file without settings is normally those weights (e.g. ``tf_efficientnetv2_s.in1k``:
    mean = std = 0.5, not ImageNet's)."""
    init_settings = None
    if config.init is not None and settings_path(config.init).exists():
        init_settings = read_settings(settings_path(config.init))
    arch = config.arch or (init_settings.arch if init_settings is not None else DEFAULT_TRAIN_ARCH)
    if init_settings is not None and init_settings.arch == arch:
        return DiscriminatorSettings(arch, config.image_size, init_settings.mean, init_settings.std)
    return default_settings(arch, config.image_size)


def train_discriminator(real: list[Path], fake: list[Path], config: TrainConfig, *,
                        progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train on image files; ``log`` receives one line per epoch (and the set-up lines)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    config.validate()
    verify_images(real + fake)
    if config.val_fraction > 0 and (len(real) < 2 or len(fake) < 2):
        raise DiffsimError(f"need at least 2 real and 2 generated images to hold out a validation split "
                           f"(have {len(real)} real, {len(fake)} generated); or pass --val-fraction 0")

    settings = _training_settings(config)

    paths = list(real) + list(fake)
    labels = np.array([REAL_CLASS] * len(real) + [GENERATED_CLASS] * len(fake), dtype=np.int64)
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    counts = {
        "train": {CLASS_NAMES[c]: int((labels[train_idx] == c).sum()) for c in (REAL_CLASS, GENERATED_CLASS)},
        "val": {CLASS_NAMES[c]: int((labels[val_idx] == c).sum()) for c in (REAL_CLASS, GENERATED_CLASS)},
    }

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(config.seed)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        model, note = _init_model(settings.arch, config.init)
        log(f"discriminator {settings.arch} at {settings.image_size} px ({note}); train {counts['train']}, "
            f"val {counts['val']}")
        history = _fit(model, settings, paths, labels, train_idx, val_idx, config, progress, log,
                       torch, DataLoader, tqdm)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    return TrainResult(model.cpu().eval(), settings, history, counts)


def _fit(model, settings, paths, labels, train_idx, val_idx, config, progress, log, torch, DataLoader, tqdm):
    device = torch.device(config.device)
    model.to(device)
    train_set = _ImageDataset([paths[i] for i in train_idx], labels[train_idx], train_transform(settings))
    val_set = _ImageDataset([paths[i] for i in val_idx], labels[val_idx], eval_transform(settings))
    generator = torch.Generator().manual_seed(config.seed)
    # A last batch of one image would break batch norm on small feature maps: drop it then.
    drop_last = len(train_set) % config.batch_size == 1 and len(train_set) > 1
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                              num_workers=config.workers, drop_last=drop_last)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    # The training images without augmentation, for re-estimating batch-norm statistics.
    calib_set = _ImageDataset(train_set.paths, train_set.labels, eval_transform(settings))
    calib_loader = DataLoader(calib_set, batch_size=config.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(config.seed + 1), num_workers=config.workers)

    # Class-balanced loss: each class weighs the same whatever the real/generated ratio.
    train_labels = labels[train_idx]
    weights = torch.tensor([len(train_labels) / (2.0 * max(1, (train_labels == c).sum())) for c in (0, 1)],
                           dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

    history = []
    bar = tqdm(total=steps, desc="train", unit="batch", disable=not progress, leave=False)
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            for x, y in train_loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = float(loss.detach())
                total_loss += loss_value * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}")
            metrics = EpochMetrics(epoch, total_loss / max(1, seen), correct / max(1, seen))
            recalibrate_batch_norm(model, calib_loader, device, torch)
            if len(val_set):
                metrics.val_loss, metrics.val_accuracy, metrics.val_roc_auc = _evaluate(
                    model, val_loader, loss_fn, settings.real_class, device, torch)
            history.append(metrics)
            log(metrics.line())
    finally:
        bar.close()
    return history


def recalibrate_batch_norm(model, loader, device, torch, max_batches: int = 50) -> None:
    """Replace batch-norm running statistics by plain averages over (up to ``max_batches`` of) the training
    images under the current weights. With few optimiser steps the running averages trail the fast-changing
    weights, and a network that separates the classes in training mode can score everything alike in
    evaluation mode; re-estimating them (as SWA's ``update_bn`` does) fixes that at the cost of a forward pass."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i, (x, _y) in enumerate(loader):
            if i >= max_batches:
                break
            model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def _evaluate(model, loader, loss_fn, real_class, device, torch) -> tuple[float, float, float]:
    model.eval()
    all_labels, all_scores, total_loss = [], [], 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            total_loss += float(loss_fn(logits, y)) * len(y)
            all_scores.append(torch.softmax(logits, 1)[:, real_class].cpu().numpy())
            all_labels.append(y.cpu().numpy())
    labels, scores = np.concatenate(all_labels), np.concatenate(all_scores)
    accuracy = float(((scores >= 0.5) == (labels == real_class)).mean())
    return total_loss / len(labels), accuracy, roc_auc(labels == real_class, scores)


def save_discriminator(result: TrainResult, out: str | Path, config: TrainConfig, *,
                       real_dir: str = "", fake_dir: str = "") -> tuple[Path, Path]:
    """Write ``out`` (safetensors, no pickle) and its settings ``out.json``; both written atomically."""
    import timm
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise DiffsimError(f"{out}: the output weights file must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    last = result.history[-1]
    extra = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "init": str(config.init) if config.init else None,
        "augmentation": "RandomResizedCrop(scale 0.5-1) + horizontal flip",
        "preprocessing": "resize short side, centre crop, ToTensor, normalise",
        "confidence": f"P(real) = softmax(logits)[{REAL_CLASS}]",
        "real_dir": real_dir,
        "fake_dir": fake_dir,
        "counts": result.counts,
        "final": {"val_accuracy": last.val_accuracy, "val_roc_auc": _json_float(last.val_roc_auc),
                  "train_accuracy": last.train_accuracy},
        "history": [{k: _json_float(v) for k, v in asdict(m).items()} for m in result.history],
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    }
    settings = DiscriminatorSettings(result.settings.arch, result.settings.image_size, result.settings.mean,
                                     result.settings.std, result.settings.real_class, extra)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"arch": settings.arch, "image_size": str(settings.image_size)})
    os.replace(tmp, out)
    js = settings_path(out)
    tmp_js = js.with_name(js.name + ".tmp")
    tmp_js.write_text(json.dumps(settings.to_json(), indent=2) + "\n")
    os.replace(tmp_js, js)
    return out, js


def _json_float(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
