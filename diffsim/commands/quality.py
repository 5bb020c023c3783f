"""``diffsim quality``: measure the image quality of a folder of images.

  stats       Inception feature statistics of a folder -> reference .npz for FID
  fid         FID of a folder against reference stats or a reference folder (sample sizes always reported)
  kid         KID of a folder against a reference folder (fits small samples)
  clip-score  CLIP score of images against their prompts, with a local CLIP model

Building the parser imports nothing heavy; torch and transformers are imported inside ``run``.
The per-image CSV writer and the --batch-size/--device options live here and are shared with
``diffsim discriminator``, so that both commands read and write the same way.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from .. import limits
from ..errors import DiffsimError, InputError
from .args import bounded, nonempty_path

DESCRIPTION = """Image quality of a folder of images:

  stats       Inception feature statistics of a folder, saved as the reference .npz for FID
  fid         FID of a folder against reference statistics or a reference folder (sample sizes always reported)
  kid         KID of a folder against a reference folder (fits small samples)
  clip-score  CLIP score of images against their prompts, with a local CLIP model

Run diffsim quality ACTION --help for an action's options."""
SUBSET_SIZE = limits.Range(2, 1_000_000, integer=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quality", help="image quality of a folder: FID, KID, reference stats, CLIP score",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    st = sub.add_parser("stats", help="reference feature statistics (.npz) of an image folder")
    st.add_argument("--images", required=True, type=nonempty_path, metavar="DIR",
                    help="folder of images (e.g. real photographs) to describe")
    st.add_argument("--out", required=True, type=nonempty_path, help="output .npz (mu, sigma, n, feature)")
    _add_inception_args(st)

    f = sub.add_parser("fid", help="FID of a folder against reference statistics or images")
    f.add_argument("--images", required=True, type=nonempty_path, metavar="DIR",
                   help="folder of images to score (e.g. generated ones)")
    ref = f.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref-stats", type=nonempty_path, help=".npz from `diffsim quality stats`")
    ref.add_argument("--ref-images", type=nonempty_path, metavar="DIR", help="folder of reference images")
    f.add_argument("--allow-small", action="store_true",
                   help="allow n <= feature dim (singular covariance: FID biased upward, comparable only at equal n)")
    f.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    _add_inception_args(f)

    k = sub.add_parser("kid", help="KID of a folder against a reference folder")
    k.add_argument("--images", required=True, type=nonempty_path, metavar="DIR", help="folder of images to score")
    k.add_argument("--ref-images", required=True, type=nonempty_path, metavar="DIR", help="folder of reference images")
    k.add_argument("--subsets", type=limits.COUNT, default=100,
                   help=bounded("random subsets the KID is averaged over", limits.COUNT, 100))
    k.add_argument("--subset-size", type=SUBSET_SIZE,
                   help=bounded("images per subset; at most the smaller folder", SUBSET_SIZE,
                                "min(1000, both folder sizes)"))
    k.add_argument("--seed", type=limits.SEED, default=0, help=bounded("seed of the subsets", limits.SEED, 0))
    k.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    _add_inception_args(k)

    c = sub.add_parser("clip-score", help="CLIP score of images against prompts")
    c.add_argument("--images", required=True, type=nonempty_path, metavar="DIR", help="folder of images to score")
    c.add_argument("--prompts", required=True, type=nonempty_path, help="CSV with header image,prompt")
    c.add_argument("--clip", required=True, type=nonempty_path, help="local transformers CLIPModel directory")
    c.add_argument("--out", type=nonempty_path, help="per-image CSV image,clip_score (default: only the mean)")
    add_batch_and_device_args(c)
    p.set_defaults(_parser=p)


def run(args) -> int:
    actions = {"stats": _stats, "fid": _fid, "kid": _kid, "clip-score": _clip_score}
    if getattr(args, "action", None) is None:
        args._parser.print_help()
        return 2
    return actions[args.action](args)


# ---------------------------------------------------------------- helpers shared with `diffsim discriminator`


def add_batch_and_device_args(parser: argparse.ArgumentParser) -> None:
    """--batch-size (images per forward pass, default 32) and --device (torch device, default cpu)."""
    parser.add_argument("--batch-size", type=limits.BATCH_SIZE, default=32,
                        help=bounded("images per forward pass", limits.BATCH_SIZE, 32))
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DiffsimError(f"--batch-size must be >= 1, got {batch_size}")


def write_csv(out: Path | None, header: tuple[str, ...], rows: list[tuple]) -> None:
    """Write a per-image CSV to ``out``, or to stdout when ``out`` is None."""
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


# ---------------------------------------------------------------- Inception features: stats, FID, KID


def _add_inception_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-weights", required=True, type=nonempty_path,
                        help="torchvision Inception-v3 weights as safetensors (local file)")
    parser.add_argument("--feature-dim", type=int, default=2048, choices=(64, 192, 768, 2048),
                        help="Inception feature: 2048 = final pool (standard); smaller ones need fewer images")
    add_batch_and_device_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _extractor(args):
    from diffsim.quality.features import InceptionFeatures

    check_batch_size(args.batch_size)
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


# ---------------------------------------------------------------- CLIP score


def read_prompts(path: Path) -> dict[str, str]:
    """CSV ``image,prompt`` -> {image file name: prompt}; one-line errors naming the line."""
    if not path.exists():
        raise InputError(f"{path}: no such prompts file")
    from ..textfile import read_text

    prompts: dict[str, str] = {}
    with io.StringIO(read_text(path), newline="") as fh:  # not UTF-8: one line naming the file
        reader = csv.reader(fh)
        try:
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
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise InputError(f"{path}: line {reader.line_num}: bad CSV ({e})") from None
    return prompts


def _clip_score(args) -> int:
    from diffsim.quality.features import ClipScorer
    from diffsim.quality.images import list_images, open_image

    check_batch_size(args.batch_size)
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
        write_csv(args.out, ("image", "clip_score"), [(p.name, f"{s:.4f}") for p, s in zip(paths, scores)])
    print(f"CLIP score {sum(scores) / len(scores):.4f} (mean over {len(scores)} images)")
    return 0
