"""``diffsim calibrate``: measure a cascade's quality profile from generated images and write it as a cascades file.

For each prompt the light and the heavy model generate one image (seeded per prompt), the discriminator scores
the light image, and Inception features of all images are compared with the real images' to get the FID of the
served mix against the light-served fraction. See :mod:`diffsim.profiling.calibration` for what is computed.

Writes ``--out`` (a cascades YAML with one cascade, loadable with ``diffsim simulate --cascades``) and the
per-prompt confidences beside it (``<out>.confidences.csv``). ``--images-only`` just generates and saves images
(e.g. the light model's images to train the discriminator on). torch is imported only inside ``run``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

from .. import limits
from ..errors import DiffsimError, InputError
from ..progress import progress_bar, progress_enabled
from .args import bounded, nonempty_path

DEFAULT_GPU_PROFILE = "a100"
DESCRIPTION = """Measure a cascade's quality profile from generated images and write it as a cascades file.

For each prompt the light and the heavy model generate one image (seeded per prompt), the discriminator
scores the light image, and Inception features of all images are compared with the real images' to give
the FID of the served mix against the light-served fraction (easiest prompts light), and of a random mix.

Writes --out (a cascades YAML with one cascade, for diffsim simulate --cascades FILE) and the per-prompt
confidences beside it (<out>.confidences.csv). --images-only only generates and saves images (e.g. the
light model's images to train the discriminator on)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="measure a cascade's deferral curve and FID-vs-light-fraction from generated images",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cascade", required=True, metavar="C",
                   help="cascade name; a shipped one (e.g. sdturbo-sdv15) gives models and SLO, "
                   "any other name needs --light, --heavy and --slo-s")
    p.add_argument("--prompts", required=True, type=nonempty_path, metavar="FILE",
                   help="one prompt per line (ids = 0-based line positions), or CSV with header prompt_id,prompt")
    p.add_argument("--real", type=nonempty_path, metavar="DIR|NPZ",
                   help="folder of real images, or their Inception statistics (.npz from "
                   "`diffsim quality stats`), the FID reference")
    p.add_argument("--backend", required=True, choices=("cuda", "cpu-tiny"),
                   help="cuda (full models, fp16) or cpu-tiny (tiny random models, for tests)")
    p.add_argument("--out", type=nonempty_path, metavar="FILE.yaml",
                   help="cascades file to write (e.g. profiles/mine.yaml)")
    p.add_argument("--light", help="light model (default: the shipped cascade's)")
    p.add_argument("--heavy", help="heavy model (default: the shipped cascade's)")
    p.add_argument("--slo-s", type=limits.SLO_S,
                   help=bounded("SLO in seconds", limits.SLO_S, "the shipped cascade's"))
    p.add_argument("--weights", default="random",
                   help="random (no download), hub, a pipeline directory, a folder of per-model pipeline "
                   "directories (DIR/sd-turbo, DIR/sd-v1.5), or NAME=SOURCE,... per model (default random)")
    p.add_argument("--discriminator-weights", metavar="FILE|random",
                   help="trained discriminator .safetensors (FILE.json beside it), or 'random' for a "
                   "random head (smoke tests only: its confidences mean nothing)")
    p.add_argument("--discriminator-arch", help="timm arch when the weights have no FILE.json (or for random)")
    p.add_argument("--inception-weights", type=nonempty_path, metavar="FILE",
                   help="torchvision Inception-v3 weights as .safetensors (local file; see docs/quality.md)")
    p.add_argument("--feature-dim", type=int, default=2048, choices=(64, 192, 768, 2048),
                   help="Inception feature for FID: 2048 = final pool (standard); smaller ones need fewer images")
    p.add_argument("--allow-small", action="store_true",
                   help="allow FID on n <= feature-dim images (singular covariance: biased upward; tests only)")
    p.add_argument("--batch-size", type=limits.BATCH_SIZE, default=8,
                   help=bounded("generation batch size", limits.BATCH_SIZE, 8))
    p.add_argument("--seed", type=limits.SEED, default=0,
                   help=bounded("seed of the per-prompt generation seeds and of the random mix", limits.SEED, 0))
    p.add_argument("--r-grid", default="0:1:0.1", help="light-served fractions for the FID curves "
                   "(comma list or START:STOP:STEP, from 0 to 1; default 0:1:0.1)")
    p.add_argument("--thresholds", default="0:1:0.005", help="threshold grid of the deferral curve "
                   "(comma list or START:STOP:STEP, from 0 to 1; default 0:1:0.005)")
    p.add_argument("--limit", type=limits.COUNT, metavar="N",
                   help=bounded("use only the first N prompts", limits.COUNT))
    p.add_argument("--save-images", type=nonempty_path, metavar="DIR",
                   help="also write the images: DIR/light/<id>.png, DIR/heavy/<id>.png, DIR/prompts.csv")
    p.add_argument("--images-only", choices=("light", "heavy", "both"),
                   help="only generate and save images (needs --save-images; no profile is written)")
    p.add_argument("--no-confidences-link", action="store_true",
                   help="write the confidences CSV but leave the profile's `confidences` field out, so the "
                   "simulator draws confidences from f(t) (for traces whose prompt ids the CSV does not cover)")
    p.add_argument("--gpu", default=DEFAULT_GPU_PROFILE, metavar="a100|PATH",
                   help="GPU latency profile used to check that the allocator accepts the result (default a100)")
    p.add_argument("--device", default="0", help="CUDA device index (cuda backend)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (drawn on stderr, and only when it is a terminal)")


def _cascade_models(args) -> tuple[str, str, float]:
    """Light, heavy and SLO: the shipped cascade's, overridden by the flags."""
    from ..profiles import load_cascades
    from ..resources import profiles_dir

    shipped = load_cascades(profiles_dir() / "cascades.yaml").cascades.get(args.cascade)
    light = args.light or (shipped.light if shipped else None)
    heavy = args.heavy or (shipped.heavy if shipped else None)
    slo = args.slo_s if args.slo_s is not None else (shipped.slo_s if shipped else None)
    if light is None or heavy is None or slo is None:
        raise DiffsimError(f"--cascade {args.cascade!r} is not a shipped cascade: give --light, --heavy and --slo-s")
    if not slo > 0:
        raise DiffsimError(f"--slo-s must be > 0, got {slo:g}")
    return light, heavy, float(slo)


def run(args: argparse.Namespace) -> int:
    from backends.registry import check_backend_and_model

    from ..profiling import calibration as cal
    from ..profiling.profiler import weights_for
    from ..resources import resolve_profile

    light, heavy, slo = _cascade_models(args)
    for model in (light, heavy):
        check_backend_and_model(args.backend, model)
    if light == heavy:
        raise DiffsimError(f"the light and heavy model are both {light!r}")
    if args.batch_size < 1:
        raise DiffsimError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = cal.read_prompts(args.prompts, limit=args.limit)
    seeds = [cal.prompt_seed(p.prompt_id, args.seed) for p in prompts]
    weights = weights_for(args.weights, [light, heavy])
    try:
        device = int(str(args.device).removeprefix("cuda:"))
    except ValueError:
        raise DiffsimError(f"--device: expected a CUDA device index, got {args.device!r}") from None

    def executor(model: str, with_discriminator: bool):
        from backends import make_executor

        disc = args.discriminator_weights
        return make_executor(args.backend, model, weights=weights[model], device=device,
                             discriminator=with_discriminator,
                             discriminator_weights=None if disc in (None, "random") else disc,
                             discriminator_arch=args.discriminator_arch)

    if args.images_only:
        return _images_only(args, prompts, seeds, executor, light, heavy)

    # Check every input before the first (slow) model load.
    if args.out is None:
        raise DiffsimError("--out is required (the cascades file to write), unless --images-only")
    if args.out.suffix not in (".yaml", ".yml"):
        raise DiffsimError(f"{args.out}: the output cascades file must end in .yaml")
    for flag, value in (("--real", args.real), ("--inception-weights", args.inception_weights),
                        ("--discriminator-weights", args.discriminator_weights)):
        if value is None:
            raise DiffsimError(f"{flag} is required to calibrate (see diffsim calibrate --help)")
    if args.discriminator_weights != "random" and not Path(args.discriminator_weights).is_file():
        raise InputError(f"{args.discriminator_weights}: no such discriminator weights file")
    thresholds = cal.parse_grid(args.thresholds, "--thresholds")
    r_grid = cal.parse_grid(args.r_grid, "--r-grid")
    gpu_profile = resolve_profile(args.gpu)
    _check_sample_sizes(args, len(prompts))

    from diffsim.quality.features import InceptionFeatures

    light_ex = executor(light, True)
    extractor = InceptionFeatures(args.inception_weights, dim=args.feature_dim, device=light_ex.device,
                                  batch_size=max(args.batch_size, 8))
    reference = _reference(args, extractor)
    _log(f"reference: {reference.n} real images, {extractor.dim}-d {extractor.name}")

    light_out = _stage(args, light_ex, "light", prompts, seeds, extractor, score=True)
    gpu = _gpu_name(light_ex)
    light_ex.unload()
    heavy_ex = executor(heavy, False)
    heavy_out = _stage(args, heavy_ex, "heavy", prompts, seeds, extractor, score=False)
    heavy_ex.unload()
    if args.save_images is not None:
        cal.write_prompt_index(args.save_images / "prompts.csv", prompts)

    confidences = light_out.confidences
    with progress_bar(enabled=not args.no_progress, total=2 * len(r_grid), desc="FID of the mixes",
                      unit="FID") as bar:
        fid = cal.mix_fid_curve(light_out.features, heavy_out.features, cal.easiest_first(confidences), r_grid,
                                reference, allow_small=args.allow_small, progress=bar.update)
        fid_random = cal.mix_fid_curve(light_out.features, heavy_out.features,
                                       cal.random_order(len(prompts), args.seed), r_grid, reference,
                                       allow_small=args.allow_small, progress=bar.update)
    small = len(prompts) <= extractor.dim or reference.n <= extractor.dim
    result = cal.Calibration(
        name=args.cascade, light=light, heavy=heavy, slo_s=slo, prompts=prompts, confidences=confidences,
        thresholds=thresholds, r_grid=r_grid, fid=fid, fid_random_mix=fid_random, gpu=gpu,
        date=datetime.date.today().isoformat(), software=_software(args.backend),
        method=_method(args, light, heavy, weights, len(prompts), reference.n, extractor.name),
        notes=("SMALL SAMPLE: n <= feature dimension, the FIDs are biased upward and comparable only at equal n. "
               if small else "") + f"real images: {args.real}",
    )
    out, csv_path = cal.write_calibration(result, args.out, link_confidences=not args.no_confidences_link,
                                          check=lambda tmp: cal.validate_profile(tmp, args.cascade, gpu_profile))
    plan = cal.validate_profile(out, args.cascade, gpu_profile)
    _report(result, out, csv_path, plan, gpu_profile)
    return 0


def _report(result, out: Path, csv_path: Path, plan, gpu_profile: Path) -> None:
    import numpy as np

    fid, fid_random, r_grid = result.fid, result.fid_random_mix, result.r_grid
    best = int(np.argmin(fid))
    f_half = _at(result.thresholds, result.deferral, 0.5)
    print(f"wrote {out} and {csv_path}: cascade {result.name} ({result.light} -> {result.heavy}), "
          f"{len(result.prompts)} prompts")
    print(f"  confidence: median {float(np.median(result.confidences)):.4f}; f(0.5) = {f_half}")
    print(f"  FID easiest-light: r=0 {fid[0]:.3f}, r=1 {fid[-1]:.3f}, best {fid[best]:.3f} at r={r_grid[best]:g}")
    print(f"  FID random mix:    r=0 {fid_random[0]:.3f}, r=1 {fid_random[-1]:.3f}")
    print(f"  allocator check ({gpu_profile.name}, 2 GPUs, 1 qps): "
          f"{'feasible' if plan.feasible else 'infeasible: ' + plan.reason}, threshold {plan.threshold:g}")


def _images_only(args, prompts, seeds, executor, light: str, heavy: str) -> int:
    from ..profiling import calibration as cal

    if args.save_images is None:
        raise DiffsimError("--images-only needs --save-images DIR")
    roles = {"light": [("light", light)], "heavy": [("heavy", heavy)],
             "both": [("light", light), ("heavy", heavy)]}[args.images_only]
    for role, model in roles:
        ex = executor(model, False)
        _stage(args, ex, role, prompts, seeds, None, score=False)
        ex.unload()
    index = cal.write_prompt_index(args.save_images / "prompts.csv", prompts)
    print(f"wrote {len(prompts)} images per model into {', '.join(str(args.save_images / r) for r, _ in roles)} "
          f"and {index}")
    return 0


def _check_sample_sizes(args, n_prompts: int) -> None:
    from diffsim.quality.frechet import check_sample_size, load_stats
    from diffsim.quality.images import list_images

    check_sample_size(n_prompts, args.feature_dim, allow_small=args.allow_small, what=f"prompts file {args.prompts}")
    if args.real.suffix == ".npz":
        stats = load_stats(args.real)
        if stats.dim != args.feature_dim:
            raise InputError(f"{args.real}: statistics are {stats.dim}-d but --feature-dim is {args.feature_dim}")
        n_real = stats.n
    else:
        n_real = len(list_images(args.real, what="real image folder"))
    check_sample_size(n_real, args.feature_dim, allow_small=args.allow_small, what=f"reference {args.real}")


def _reference(args, extractor):
    from diffsim.quality.frechet import FeatureStats, feature_stats, load_stats
    from diffsim.quality.images import list_images

    if args.real.suffix == ".npz":
        stats = load_stats(args.real)
        if stats.feature and stats.feature != extractor.name:
            raise InputError(f"{args.real}: statistics come from feature extractor {stats.feature!r}, not "
                             f"{extractor.name!r}: FIDs across extractors are not comparable")
        return stats
    paths = list_images(args.real, what="real image folder")
    feats = extractor.features_of_files(paths, progress=not args.no_progress and progress_enabled())
    mu, sigma = feature_stats(feats)
    return FeatureStats(mu, sigma, len(feats), extractor.name)


def _stage(args, executor, role: str, prompts, seeds, extractor, *, score: bool):
    from ..profiling import calibration as cal

    save_dir = args.save_images / role if args.save_images is not None else None
    with progress_bar(enabled=not args.no_progress, total=len(prompts), desc=f"{role} {executor.model}",
                      unit="img", leave=True) as bar:
        return cal.run_stage(executor, prompts, seeds, batch_size=args.batch_size, extractor=extractor, score=score,
                             save_dir=save_dir, progress=bar.update)


def _gpu_name(executor) -> str:
    if str(getattr(executor, "device", "cpu")).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(executor.device)
    return f"CPU ({platform.processor() or platform.machine()}), backend {executor.backend}"


def _software(backend: str) -> dict[str, str]:
    from .. import __version__
    from ..profiling.profiler import software_versions

    versions = software_versions(backend)
    versions["diffsim"] = __version__
    import torchvision

    versions["torchvision"] = torchvision.__version__
    return versions


def _method(args, light, heavy, weights, n_prompts, n_real, feature_name) -> str:
    disc = args.discriminator_weights
    if disc == "random":
        disc = f"random head ({args.discriminator_arch or 'default arch'}; meaningless confidences)"
    else:
        from diffsim.quality.features import file_digest

        disc = f"{disc} (sha256:{file_digest(Path(disc))})"
    return (f"backend {args.backend}; light {light} (weights {weights[light]}); heavy {heavy} "
            f"(weights {weights[heavy]}); discriminator {disc}; {n_prompts} prompts from {args.prompts}, "
            f"seed {args.seed}, one image per prompt and model; FID vs {n_real} real images, {feature_name}")


def _at(grid, values, x: float) -> str:
    return f"{values[grid.index(x)]:.3f}" if x in grid else "-"


def _log(line: str) -> None:
    print(line, file=sys.stderr)
