"""``diffsim discriminator``: train and run the cascade's discriminator.

  train       real vs generated image folders -> FILE.safetensors + FILE.json
  score       one CSV row ``image,confidence`` (P(real)) per image in a folder, sorted by name

FID, KID, reference statistics and CLIP score are measured by ``diffsim quality``.

Building the parser imports nothing heavy; torch and timm are imported inside ``run``.
Unset training options fall back to ``backends.discriminator_training.TrainConfig``'s defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .. import limits
from ..errors import DiffsimError
from .args import bounded, nonempty_path
from .quality import add_batch_and_device_args, check_batch_size, write_csv

DESCRIPTION = """Train and run the cascade's discriminator:

  train       real vs generated image folders -> FILE.safetensors + FILE.json
  score       one CSV row image,confidence (P(real)) per image of a folder, sorted by name

FID, KID, reference statistics and CLIP score are measured by diffsim quality.
Run diffsim discriminator ACTION --help for an action's options."""
IMAGE_SIZE = limits.Range(32, 4096, integer=True)
TRAIN_BATCH_SIZE = limits.Range(2, 4096, integer=True)
LEARNING_RATE = limits.Range(0, 10, lo_open=True)
VAL_FRACTION = limits.Range(0, 0.9)
WORKERS = limits.Range(0, 256, integer=True)

CONFIDENCE_FORMAT = "{:.8f}"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("discriminator", help="train / score the discriminator (P(real) per image)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    t = sub.add_parser("train", help="train real vs generated", description=(
        "Train a 2-class EfficientNet (1 = real, 0 = generated). Defaults (efficientnet_b0, 64 px, 10 epochs) "
        "check the pipeline on a few dozen images in seconds on a CPU. For a real discriminator use thousands of "
        "images and an EfficientNet-V2-S (the paper's network) from ImageNet weights: --arch tf_efficientnetv2_s "
        "--init model.safetensors (timm's tf_efficientnetv2_s.in1k file; its 1000-class head is replaced) "
        "--image-size 224 --epochs 20 --lr 1e-4 --device cuda."))
    t.add_argument("--real", required=True, type=nonempty_path, help="folder of real images (class 1)")
    t.add_argument("--fake", required=True, type=nonempty_path, help="folder of generated images (class 0)")
    t.add_argument("--out", required=True, type=nonempty_path,
                   help="output FILE.safetensors (settings go to FILE.json)")
    t.add_argument("--arch", help="timm EfficientNet name (default: the --init file's, else efficientnet_b0)")
    t.add_argument("--epochs", type=limits.COUNT, help=bounded("passes over the training split", limits.COUNT, 10))
    t.add_argument("--image-size", type=IMAGE_SIZE,
                   help=f"input size in px (default 64; 224 for serving quality; {IMAGE_SIZE})")
    t.add_argument("--batch-size", type=TRAIN_BATCH_SIZE,
                   help=bounded("images per step (batch norm needs 2)", TRAIN_BATCH_SIZE, 16))
    t.add_argument("--lr", type=LEARNING_RATE,
                   help=bounded("AdamW learning rate, cosine-decayed", LEARNING_RATE, 0.001))
    t.add_argument("--val-fraction", type=VAL_FRACTION,
                   help=bounded("held-out fraction per class", VAL_FRACTION, 0.2))
    t.add_argument("--seed", type=limits.SEED,
                   help=bounded("seed for the split, initialisation and augmentation", limits.SEED, 0))
    t.add_argument("--init", type=nonempty_path,
                   help="start from these safetensors weights (a non-2-class head is replaced)")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--workers", type=WORKERS,
                   help=bounded("image-loading processes; 0 loads in this process", WORKERS, 0))
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=limits.THREADS,
                   help=bounded("torch CPU threads; 1 on a busy machine", limits.THREADS, "torch's choice"))

    s = sub.add_parser("score", help="P(real) per image, as CSV")
    s.add_argument("--weights", required=True, type=nonempty_path,
                   help="FILE.safetensors (FILE.json beside it if any)")
    s.add_argument("--images", required=True, type=nonempty_path, help="folder of images")
    s.add_argument("--out", type=nonempty_path, help="CSV file to write (default: stdout)")
    s.add_argument("--arch", help="timm arch when the weights have no FILE.json")
    add_batch_and_device_args(s)
    s.add_argument("--threads", type=limits.THREADS, help=bounded("torch CPU threads", limits.THREADS, "torch's choice"))

    p.set_defaults(_parser=p)


def run(args) -> int:
    actions = {"train": _train, "score": _score}
    if getattr(args, "action", None) is None:
        args._parser.print_help()
        return 2
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise DiffsimError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    return actions[args.action](args)


def _log(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _train(args) -> int:
    from backends.discriminator_training import TrainConfig, save_discriminator, train_discriminator
    from diffsim.quality.images import list_images

    given = {"arch": args.arch, "epochs": args.epochs, "image_size": args.image_size,
             "batch_size": args.batch_size, "lr": args.lr, "val_fraction": args.val_fraction,
             "seed": args.seed, "init": args.init, "workers": args.workers}
    config = TrainConfig(device=args.device, **{k: v for k, v in given.items() if v is not None})
    if args.out.suffix != ".safetensors":
        raise DiffsimError(f"{args.out}: the output weights file must end in .safetensors")
    real = list_images(args.real, what="real image folder")
    fake = list_images(args.fake, what="generated image folder")
    result = train_discriminator(real, fake, config, progress=not args.no_progress, log=_log)
    weights, settings = save_discriminator(result, args.out, config, real_dir=str(args.real),
                                           fake_dir=str(args.fake))
    last = result.history[-1]
    _log(f"wrote {weights} and {settings} (val accuracy {_fmt(last.val_accuracy)}, "
         f"roc-auc {_fmt(last.val_roc_auc)})")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _score(args) -> int:
    from backends.discriminator import build_discriminator
    from diffsim.quality.images import list_images, open_image

    check_batch_size(args.batch_size)
    paths = list_images(args.images)
    disc = build_discriminator(args.arch, weights=args.weights, device=args.device, pretrained_random_ok=False)
    rows = []
    for i in range(0, len(paths), args.batch_size):
        batch = paths[i:i + args.batch_size]
        for path, conf in zip(batch, disc.score([open_image(p) for p in batch])):
            rows.append((path.name, CONFIDENCE_FORMAT.format(conf)))
    write_csv(args.out, ("image", "confidence"), rows)
    return 0
