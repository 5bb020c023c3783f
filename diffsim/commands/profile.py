"""``diffsim profile``: measure the models' batch latency on this machine and write a GPU profile YAML."""

from __future__ import annotations

import argparse

from .. import limits
from ..errors import DiffsimError
from .args import bounded, name_list, nonempty, number_list

DEFAULT_MODELS = "sd-turbo,sdxs,sd-v1.5,sdxl-lightning,sdxl"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure whole-pipeline batch latency per model (and the discriminator) into a GPU profile",
        description=(
            "Measure each model's whole-pipeline batch latency (p50/p95/p99 after warm-up), the "
            "discriminator's latency per batch and peak memory, and write them as a GPU profile YAML "
            "that `diffsim simulate --gpu FILE` and `diffsim plan --gpu FILE` read. A batch that runs out of memory is recorded as null."
        ),
    )
    p.add_argument("--backend", required=True, choices=("cuda", "cpu-tiny"),
                   help="cuda (full models, fp16) or cpu-tiny (tiny models, fp32)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model names (default {DEFAULT_MODELS})")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32",
                   help=bounded("strictly increasing batch sizes", limits.BATCH_SIZE, "1,2,4,8,16,32"))
    p.add_argument(
        "--weights", default="random",
        help="random (built from configs, no download), hub, a pipeline directory, a folder of per-model "
        "pipeline directories (DIR/sdxs, ...), or NAME=SOURCE,... per model",
    )
    p.add_argument("--warmup", type=limits.COUNT_OR_ZERO, default=2,
                   help=bounded("untimed calls before timing", limits.COUNT_OR_ZERO, 2))
    p.add_argument("--iters", type=limits.COUNT, default=10,
                   help=bounded("timed calls per batch size", limits.COUNT, 10))
    p.add_argument("--device", default="0", help="CUDA device index (cuda backend)")
    p.add_argument("--concurrency", type=limits.JOBS, default=1, metavar="N",
                   help="measure every batch with N executors busy at once, as N serving workers are under load "
                   "(cpu-tiny: N threads; cuda: devices --device..--device+N-1); recorded in the profile "
                   "(default 1)")
    p.add_argument("--gpu-name", default=None, help="the profile's gpu: name (default: derived from the device)")
    p.add_argument("--discriminator-weights", default=None, help="discriminator .safetensors (default: random head)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (mode=reduce-overhead; cuda only, opt-in, unmeasured)")
    p.add_argument("--out", default=None, type=nonempty,
                   help="output YAML (default: profiles/<gpu>.yaml in the data folder)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backends.registry import BACKENDS, check_backend_and_model

    from ..profiling.profiler import ProfileSettings, run_profile, write_profile
    from ..resources import profiles_dir

    if args.backend not in BACKENDS:
        raise DiffsimError(f"--backend: unknown backend {args.backend!r} (known: {', '.join(BACKENDS)})")
    models = tuple(name_list(args.models, "--models"))
    for model in models:
        check_backend_and_model(args.backend, model)
    try:
        device = int(args.device.removeprefix("cuda:"))
    except ValueError:
        raise DiffsimError(f"--device: expected a CUDA device index, got {args.device!r}") from None
    if not 0 <= device < 1024:
        raise DiffsimError(f"--device: expected a CUDA device index in 0..1023, got {args.device!r}")
    settings = ProfileSettings(
        backend=args.backend,
        models=models,
        batch_sizes=tuple(number_list(args.batch_sizes, "--batch-sizes", limits.BATCH_SIZE,
                                      most=limits.MAX_BATCH_SIZES)),
        weights=args.weights,
        warmup=args.warmup,
        iters=args.iters,
        device=device,
        gpu_name=args.gpu_name,
        discriminator_weights=args.discriminator_weights,
        compile_unet=args.compile,
        concurrency=args.concurrency,
    )
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    profile = run_profile(settings, progress=progress)
    out = Path(args.out) if args.out else profiles_dir() / f"{profile.gpu}.yaml"
    write_profile(profile, out)
    print(f"wrote {out} ({len(profile.models)} models, gpu {profile.gpu})")
    return 0
