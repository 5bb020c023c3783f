"""``diffsim discriminator``: train and run the cascade's discriminator, and measure image quality.

  train       real vs generated image folders -> FILE.safetensors + FILE.json
  score       one CSV row ``image,confidence`` (P(real)) per image in a folder, sorted by name
  stats       Inception feature statistics of a folder -> reference .npz for FID
  fid         FID of a folder against reference stats or a reference folder (sample sizes always reported)
  kid         KID of a folder against a reference folder (fits small samples)
  clip-score  CLIP score of images against their prompts, with a local CLIP model

Building the parser imports nothing heavy; torch, timm and transformers are imported inside ``run``.
Unset training options fall back to ``backends.discriminator_training.TrainConfig``'s defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from ..errors import DiffsimError, InputError

CONFIDENCE_FORMAT = "{:.8f}"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("discriminator", help="train/score the discriminator; FID, KID, CLIP score",
                              description=__doc__.split("\n\nBuilding")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    t = sub.add_parser("train", help="train real vs generated", description=(
        "Train a 2-class EfficientNet (1 = real, 0 = generated). Defaults (efficientnet_b0, 64 px, 10 epochs) "
        "check the pipeline on a few dozen images in seconds on a CPU. For a real discriminator use thousands of "
        "images and an EfficientNet-V2-S (the paper's network) from ImageNet weights: --arch tf_efficientnetv2_s "
        "--init model.safetensors (timm's tf_efficientnetv2_s.in1k file; its 1000-class head is replaced) "
        "--image-size 224 --epochs 20 --lr 1e-4 --device cuda."))
    t.add_argument("--real", required=True, type=Path, help="folder of real images (class 1)")
    t.add_argument("--fake", required=True, type=Path, help="folder of generated images (class 0)")
    t.add_argument("--out", required=True, type=Path, help="output FILE.safetensors (settings go to FILE.json)")
    t.add_argument("--arch", help="timm EfficientNet name (default: the --init file's, else efficientnet_b0)")
    t.add_argument("--epochs", type=int, help="passes over the training split (default 10)")
    t.add_argument("--image-size", type=int, help="input size in px (default 64; 224 for serving quality)")
    t.add_argument("--batch-size", type=int, help="default 16")
    t.add_argument("--lr", type=float, help="AdamW learning rate, cosine-decayed (default 0.001)")
    t.add_argument("--val-fraction", type=float, help="held-out fraction per class (default 0.2)")
    t.add_argument("--seed", type=int, help="seed for the split, initialisation and augmentation (default 0)")
    t.add_argument("--init", type=Path, help="start from these safetensors weights (a non-2-class head is replaced)")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--workers", type=int, help="image-loading processes (default 0: in-process)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")

    s = sub.add_parser("score", help="P(real) per image, as CSV")
    s.add_argument("--weights", required=True, type=Path, help="FILE.safetensors (FILE.json beside it if any)")
    s.add_argument("--images", required=True, type=Path, help="folder of images")
    s.add_argument("--out", type=Path, help="CSV file to write (default: stdout)")
    s.add_argument("--arch", help="timm arch when the weights have no FILE.json")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    def inception_args(q, need_weights=True):
        q.add_argument("--inception-weights", required=need_weights, type=Path,
                       help="torchvision Inception-v3 weights as safetensors (local file)")
        q.add_argument("--feature-dim", type=int, default=2048, choices=(64, 192, 768, 2048),
                       help="Inception feature: 2048 = final pool (standard); smaller ones need fewer images")
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--device", default="cpu")
        q.add_argument("--no-progress", action="store_true")

    st = sub.add_parser("stats", help="reference feature statistics (.npz) of an image folder")
    st.add_argument("--images", required=True, type=Path)
    st.add_argument("--out", required=True, type=Path, help="output .npz (mu, sigma, n, feature)")
    inception_args(st)

    f = sub.add_parser("fid", help="FID of a folder against reference statistics or images")
    f.add_argument("--images", required=True, type=Path)
    ref = f.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref-stats", type=Path, help=".npz from `diffsim discriminator stats`")
    ref.add_argument("--ref-images", type=Path, help="folder of reference images")
    f.add_argument("--allow-small", action="store_true",
                   help="allow n <= feature dim (singular covariance: FID biased upward, comparable only at equal n)")
    f.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    inception_args(f)

    k = sub.add_parser("kid", help="KID of a folder against a reference folder")
    k.add_argument("--images", required=True, type=Path)
    k.add_argument("--ref-images", required=True, type=Path)
    k.add_argument("--subsets", type=int, default=100)
    k.add_argument("--subset-size", type=int, help="default: min(1000, both folder sizes)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--json", action="store_true")
    inception_args(k)

    c = sub.add_parser("clip-score", help="CLIP score of images against prompts")
    c.add_argument("--images", required=True, type=Path)
    c.add_argument("--prompts", required=True, type=Path, help="CSV with header image,prompt")
    c.add_argument("--clip", required=True, type=Path, help="local transformers CLIPModel directory")
    c.add_argument("--out", type=Path, help="per-image CSV image,clip_score (default: only the mean)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--device", default="cpu")
    p.set_defaults(_parser=p)


def run(args) -> int:
    actions = {"train": _train, "score": _score, "stats": _stats, "fid": _fid, "kid": _kid,
               "clip-score": _clip_score}
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

    if args.batch_size < 1:
        raise DiffsimError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = list_images(args.images)
    disc = build_discriminator(args.arch, weights=args.weights, device=args.device, pretrained_random_ok=False)
    rows = []
    for i in range(0, len(paths), args.batch_size):
        batch = paths[i:i + args.batch_size]
        for path, conf in zip(batch, disc.score([open_image(p) for p in batch])):
            rows.append((path.name, CONFIDENCE_FORMAT.format(conf)))
    _write_csv(args.out, ("image", "confidence"), rows)
    return 0


def _write_csv(out: Path | None, header: tuple[str, ...], rows: list[tuple]) -> None:
    if out is None:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _extractor(args):
    from diffsim.quality.features import InceptionFeatures

    if args.batch_size < 1:
        raise DiffsimError(f"--batch-size must be >= 1, got {args.batch_size}")
    return InceptionFeatures(args.inception_weights, dim=args.feature_dim, device=args.device,
                             batch_size=args.batch_size)


def _features(extractor, folder: Path, args):
    from diffsim.quality.images import list_images

    paths = list_images(folder)
    return extractor.features_of_files(paths, progress=not args.no_progress)


def _stats(args) -> int:
    from diffsim.quality.frechet import feature_stats, save_stats

    extractor = _extractor(args)
    feats = _features(extractor, args.images, args)
    mu, sigma = feature_stats(feats)
    save_stats(args.out, mu, sigma, len(feats), feature=extractor.name)
    note = "" if len(feats) > extractor.dim else f" (only {len(feats)} <= {extractor.dim}: FID needs --allow-small)"
    print(f"wrote {args.out}: {len(feats)} images, {extractor.dim}-d {extractor.name}{note}")
    return 0


def _fid(args) -> int:
    from diffsim.quality.frechet import FeatureStats, check_sample_size, feature_stats, fid_against, load_stats
    from diffsim.quality.images import list_images

    paths = list_images(args.images)
    # Check sample sizes before the (slow) feature extraction.
    check_sample_size(len(paths), args.feature_dim, allow_small=args.allow_small, what=f"folder {args.images}")
    reference = None
    if args.ref_stats is not None:
        reference = load_stats(args.ref_stats)
        if reference.dim != args.feature_dim:
            raise InputError(f"{args.ref_stats}: statistics are {reference.dim}-d but --feature-dim is "
                             f"{args.feature_dim}")
    else:
        check_sample_size(len(list_images(args.ref_images)), args.feature_dim, allow_small=args.allow_small,
                          what=f"folder {args.ref_images}")
    extractor = _extractor(args)
    if reference is None:
        ref_feats = _features(extractor, args.ref_images, args)
        mu, sigma = feature_stats(ref_feats)
        reference = FeatureStats(mu, sigma, len(ref_feats), extractor.name)
    elif reference.feature and reference.feature != extractor.name:
        raise InputError(f"{args.ref_stats}: statistics come from feature extractor {reference.feature!r}, "
                         f"not {extractor.name!r}: FIDs across extractors are not comparable")
    result = fid_against(extractor.features_of_files(paths, progress=not args.no_progress), reference,
                         allow_small=args.allow_small)
    if args.json:
        print(json.dumps({**result.to_dict(), "feature": extractor.name}))
    else:
        warn = " [small sample: biased upward, compare only at equal n]" if result.small_sample else ""
        print(f"FID {result.fid:.4f} (n={result.n} images vs reference n={result.ref_n}, "
              f"{result.dim}-d {extractor.name}){warn}")
    return 0


def _kid(args) -> int:
    from diffsim.quality.frechet import kid
    from diffsim.quality.images import list_images

    n_a, n_b = len(list_images(args.images)), len(list_images(args.ref_images))
    size = args.subset_size or min(1000, n_a, n_b)
    if size < 2 or size > min(n_a, n_b):
        raise DiffsimError(f"--subset-size {size} must be in [2, {min(n_a, n_b)}] (folder sizes {n_a} and {n_b})")
    extractor = _extractor(args)
    a = _features(extractor, args.images, args)
    b = _features(extractor, args.ref_images, args)
    mean, std = kid(a, b, subsets=args.subsets, subset_size=size, seed=args.seed)
    if args.json:
        print(json.dumps({"kid": mean, "kid_std": std, "n": n_a, "ref_n": n_b, "subsets": args.subsets,
                          "subset_size": size, "feature": extractor.name}))
    else:
        print(f"KID {mean:.6f} +- {std:.6f} (n={n_a} vs reference n={n_b}, {args.subsets} subsets of {size}, "
              f"{extractor.dim}-d {extractor.name})")
    return 0


def read_prompts(path: Path) -> dict[str, str]:
    """CSV ``image,prompt`` -> {image file name: prompt}; one-line errors naming the line."""
    if not path.exists():
        raise InputError(f"{path}: no such prompts file")
    prompts: dict[str, str] = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["image", "prompt"]:
            raise InputError(f"{path}: line 1: expected the header image,prompt")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise InputError(f"{path}: line {line}: expected 2 fields (image,prompt), got {len(row)}")
            if row[0] in prompts:
                raise InputError(f"{path}: line {line}: image {row[0]!r} listed twice")
            prompts[row[0]] = row[1]
    return prompts


def _clip_score(args) -> int:
    from diffsim.quality.features import ClipScorer
    from diffsim.quality.images import list_images, open_image

    paths = list_images(args.images)
    prompts = read_prompts(args.prompts)
    missing = [p.name for p in paths if p.name not in prompts]
    if missing:
        raise InputError(f"{args.prompts}: no prompt for image {missing[0]!r} ({len(missing)} images without one)")
    scorer = ClipScorer(args.clip, device=args.device, batch_size=args.batch_size)
    scores = []
    for i in range(0, len(paths), args.batch_size):
        batch = paths[i:i + args.batch_size]
        scores.extend(scorer.scores([open_image(p) for p in batch], [prompts[p.name] for p in batch]))
    if args.out is not None:
        _write_csv(args.out, ("image", "clip_score"), [(p.name, f"{s:.4f}") for p, s in zip(paths, scores)])
    print(f"CLIP score {sum(scores) / len(scores):.4f} (mean over {len(scores)} images)")
    return 0
