"""``diffsim serve``: serve a cascade over an OpenAI-style HTTP API, with the simulator's policies."""

from __future__ import annotations

import argparse
import json

from .. import limits
from ..errors import DiffsimError
from ..runtime.batching import FALLBACKS
from .args import bounded, nonempty, number_list

DEFAULT_PORT = 8000


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a cascade over HTTP (OpenAI-style /v1/images/generations) on real workers",
        description=(
            "Serve a diffusion cascade for real: one worker per GPU (cpu-tiny: per CPU slot), the controller "
            "re-plans from the measured arrival rate, the light model's images are scored by the "
            "discriminator and low-confidence ones go on to the heavy model. Routes: POST "
            "/v1/images/generations, GET /v1/plan, GET /metrics, GET /healthz (and GET /v1/quality with "
            "--fid-reference). SIGTERM drains in-flight work and exits 0."
        ),
    )
    p.add_argument("--backend", required=True, choices=("cuda", "cpu-tiny", "emulated"),
                   help="executors: cuda, cpu-tiny, or emulated (no model: each batch sleeps for the "
                   "--gpu-profile's time; stand-in images, confidences from the deferral curve)")
    p.add_argument("--cascade", required=True, metavar="C", type=nonempty, help="cascade name, e.g. sdturbo-sdv15")
    p.add_argument("--gpus", type=limits.GPUS, metavar="N",
                   help="workers: one per GPU (default: every visible GPU; cpu-tiny: 1 CPU slot)")
    p.add_argument("--host", default="127.0.0.1", type=nonempty,
                   help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=limits.PORT, default=DEFAULT_PORT,
                   help=bounded("port; 0 = any free port", limits.PORT, DEFAULT_PORT))
    p.add_argument("--policy", default="diffserve", metavar="P", help="policy (default diffserve)")
    p.add_argument("--static-plan", metavar="JSON",
                   help='plan for --policy static, e.g. \'{"threshold": 0.2, "light_workers": 1, '
                   '"heavy_workers": 1, "light_batch": 4, "heavy_batch": 2}\' (default: the paper\'s, scaled)')
    p.add_argument("--gpu-profile", metavar="a100|PATH|measure",
                   help="latency profile the allocator plans with (default: measure on cpu-tiny, a100 on cuda and "
                   "emulated)")
    p.add_argument("--save-profile", metavar="PATH", help="write the profile the server plans with (YAML)")
    p.add_argument("--cascades", metavar="FILE", help="cascades file (default: the shipped profiles/cascades.yaml)")
    p.add_argument("--weights", nargs="+", default=["random"], metavar="SRC",
                   help="model weights: random (default), hub, a folder of per-model pipeline directories, "
                   "NAME=SOURCE pairs, or two sources (light, then heavy)")
    p.add_argument("--discriminator-weights", metavar="FILE", help="discriminator .safetensors (default: random head)")
    p.add_argument("--discriminator-arch", metavar="NAME", help="timm EfficientNet name (default efficientnetv2_s)")
    p.add_argument("--swap", action="store_true",
                   help="keep one model resident per worker, loading the other on a role change "
                   "(default: both resident, as in the paper)")
    p.add_argument("--slo-s", type=limits.SLO_S, metavar="S",
                   help=bounded("override the cascade's SLO (seconds)", limits.SLO_S))
    p.add_argument("--drop-factor", type=limits.DROP_FACTOR, default=1.5,
                   help=bounded("drop / reject when a query cannot finish within this x SLO", limits.DROP_FACTOR, 1.5))
    p.add_argument("--no-admission", action="store_true", help="queue every request (no 429 at the door)")
    p.add_argument("--batch-sizes", metavar="LIST", help="batch sizes the policy may use (default: 1,2,4 on "
                   "cpu-tiny, 1,2,4,8,16,32 on cuda)")
    p.add_argument("--routing", choices=("random", "least-loaded"),
                   help="worker choice within a stage (default least-loaded; random is the paper's)")
    p.add_argument("--max-utilization", type=limits.FRACTION_ABOVE_0, metavar="U",
                   help=bounded("plan each stage to at most this fraction of its capacity", limits.FRACTION_ABOVE_0,
                                0.8))
    p.add_argument("--preset", choices=("artifact",),
                   help="the DiffServe artifact's planning settings under the flags given: random routing, "
                        "capacity >= demand (max utilization 1), demand from the queries in the system x 1.2 "
                        "(diffsim/presets.py); the server's own promises (admission, deadline sweep) stay as set")
    p.add_argument("--queue-model", choices=("little", "mean", "tail"),
                   help="queueing delay the MILP plans with: little (measured under the plan in force, default), "
                        "mean or tail (per candidate plan; tail: --tail-quantile of latency meets the SLO)")
    p.add_argument("--tail-quantile", type=limits.QUANTILE, default=0.99, metavar="Q",
                   help=bounded("with --queue-model tail, this quantile of all queries' latency meets the SLO",
                                limits.QUANTILE, 0.99))
    p.add_argument("--demand", choices=("arrival", "in-system"),
                   help="what the demand EWMA is taken of: arrival rate (default) or queries in the system "
                        "(the artifact's)")
    p.add_argument("--stabilization-s", type=limits.STABILIZATION_S, metavar="S",
                   help=bounded("with --queue-model mean or tail: a role switch must carry the highest demand "
                                "planned for over this many seconds", limits.STABILIZATION_S, 60))
    p.add_argument("--fallback", choices=FALLBACKS, default="none",
                   help="what a deferred request whose heavy image could not be ready by its SLO deadline gets: "
                        "none = served late by the heavy model or dropped (default), light = the light image "
                        "already made for it, on time (with --queue-model mean or tail the heavy stage is then "
                        "planned to its capacity)")
    p.add_argument("--seed", type=limits.SEED, default=0,
                   help=bounded("seed of the router and of image seeds", limits.SEED, 0))
    p.add_argument("--max-n", type=limits.IMAGES_PER_REQUEST, default=8,
                   help=bounded("most images per request", limits.IMAGES_PER_REQUEST, 8))
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--threads", type=limits.THREADS, metavar="N",
                   help=bounded("torch CPU threads", limits.THREADS, "torch's"))
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--ray", metavar="ADDRESS", type=nonempty,
                   help="run the workers as Ray actors, one per GPU anywhere in a Ray cluster: local (a private "
                   "one-machine cluster), auto (the cluster started here with `ray start --head`) or HOST:PORT "
                   "(its head); the engine, queues and HTTP stay in this process. Needs the ray extra")
    p.add_argument("--worker-max-failures", type=limits.COUNT, default=3, metavar="N",
                   help="take a worker out of service after N failed batches in a row (default 3); it is probed "
                   "every --worker-probe-s and returns when a probe succeeds")
    p.add_argument("--worker-probe-s", type=limits.PERIOD_S, default=5.0, metavar="S",
                   help=bounded("how often a worker out of service (failing or lost) is probed", limits.PERIOD_S, 5))
    p.add_argument("--drain-quiet-s", type=limits.DELAY_S, default=2.0, metavar="S",
                   help=bounded("after SIGTERM, once in-flight work is done, keep answering new requests 503 "
                                "until none has come for S seconds (clients and load balancers still sending "
                                "are told to go elsewhere rather than refused a connection)", limits.DELAY_S, 2))
    p.add_argument("--drain-max-s", type=limits.DELAY_S, default=30.0, metavar="S",
                   help=bounded("the longest a drain keeps the socket open after SIGTERM for clients still "
                                "sending", limits.DELAY_S, 30))
    p.add_argument("--ray-max-restarts", type=limits.RESTARTS, default=-1, metavar="N",
                   help="times Ray restarts a dead worker actor (default -1: always); a restarted worker "
                   "reloads its models and rejoins the plan")
    q = p.add_argument_group(
        "served-image quality",
        "With --fid-reference, a background thread keeps a uniform sample of the images served in each window "
        "(at most --fid-sample, reservoir sampling), computes their Inception features off the request path and "
        "reports the FID of each window's sample against the reference, overall and per stage, with its sample "
        "size, on GET /v1/quality and as the gauges diffsim_served_fid{stage} and "
        "diffsim_served_fid_sample_size{stage} on /metrics. A window whose sample has no more images than the "
        "feature dimension gets the reason instead of a number (its covariance would be singular): use "
        "reference statistics at a lower feature dimension (diffsim quality stats --feature-dim) for low-traffic "
        "servers.")
    q.add_argument("--fid-reference", metavar="STATS.npz",
                   help="reference statistics from `diffsim quality stats` (their feature dimension is used)")
    q.add_argument("--inception-weights", metavar="FILE",
                   help="the Inception-v3 safetensors the statistics were made with (required with "
                   "--fid-reference; statistics from other weights are refused)")
    q.add_argument("--fid-window-s", type=limits.PERIOD_S, default=60.0, metavar="S",
                   help=bounded("length of a quality window in seconds", limits.PERIOD_S, 60))
    q.add_argument("--fid-sample", type=limits.COUNT, metavar="N",
                   help="images sampled per window, at most (default: twice the feature dimension)")
    q.add_argument("--fid-device", default="cpu", metavar="DEV",
                   help="torch device for the Inception features (default cpu; e.g. cuda:0 to share a GPU)")


def options_from_args(args: argparse.Namespace):
    from ..server.startup import ServeOptions

    gpus = args.gpus
    if gpus is None:
        gpus = _visible_gpus() if args.backend == "cuda" else 1
    static_plan = None
    if args.static_plan:
        try:
            static_plan = json.loads(args.static_plan)
        except json.JSONDecodeError as e:
            raise DiffsimError(f"--static-plan: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(static_plan, dict):
            raise DiffsimError("--static-plan: expected a JSON object")
        from ..policies import StaticPlanSpec

        try:  # fields, types and bounds now, not when the first plan is applied
            StaticPlanSpec.from_dict(static_plan)
        except DiffsimError as e:
            raise DiffsimError(f"--static-plan: {str(e).removeprefix('static plan: ')}") from None
    sizes = None
    if args.batch_sizes is not None:  # an empty list is an error, not the default
        sizes = tuple(number_list(args.batch_sizes, "--batch-sizes", limits.BATCH_SIZE, unique=True,
                                  most=limits.MAX_BATCH_SIZES))
    from ..config import HealthConfig
    from ..errors import InputError

    planning = _planning(args)

    try:
        health = HealthConfig(max_failures=args.worker_max_failures, probe_s=args.worker_probe_s)
    except InputError as e:
        flag = "--worker-max-failures" if "max_failures" in str(e) else "--worker-probe-s"
        raise DiffsimError(f"{flag}: {str(e).split(': ', 2)[-1]}") from None
    return ServeOptions(
        backend=args.backend, cascade=args.cascade, gpus=gpus, policy=args.policy, gpu_profile=args.gpu_profile,
        cascades=args.cascades, weights=tuple(args.weights), discriminator_weights=args.discriminator_weights,
        discriminator_arch=args.discriminator_arch, swap=args.swap, slo_s=args.slo_s,
        drop_factor=args.drop_factor, batch_sizes=sizes, static_plan=static_plan, routing=planning["routing"],
        max_utilization=planning["max_utilization"], controller=planning["controller"], seed=args.seed,
        admission=not args.no_admission, save_profile=args.save_profile,
        fid_reference=args.fid_reference, inception_weights=args.inception_weights, fid_window_s=args.fid_window_s,
        fid_sample=args.fid_sample, fid_device=args.fid_device, ray=args.ray, ray_max_restarts=args.ray_max_restarts,
        queue_model=args.queue_model, tail_quantile=args.tail_quantile, fallback=args.fallback,
        health=health,
    )


def _planning(args: argparse.Namespace) -> dict:
    """Routing, utilisation cap and controller: the flags given, over the preset, over the defaults."""
    from ..config import ControllerConfig
    from ..policies import DEFAULT_MAX_UTILIZATION
    from ..presets import apply_preset

    given = {key: value for key, value in (("routing", args.routing), ("max_utilization", args.max_utilization),
                                           ("demand", args.demand)) if value is not None}
    chosen = apply_preset(args.preset, given)
    controller = {**chosen.get("controller", {}), "demand": chosen.get("demand", "arrival")}
    if args.stabilization_s is not None:
        controller["stabilization_s"] = args.stabilization_s
    controller = ControllerConfig(**controller)
    return {"routing": chosen.get("routing", "least-loaded"),
            "max_utilization": chosen.get("max_utilization", DEFAULT_MAX_UTILIZATION), "controller": controller}


def _visible_gpus() -> int:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise DiffsimError("backend cuda: no CUDA device is available; use --backend cpu-tiny")
    return n


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from ..server.startup import bind_socket, check_options, serve
    from ..server.http import HttpSettings

    options = options_from_args(args)
    check_options(options)  # before loading anything: names, files, numbers
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..server.startup import cascade_models

    light, heavy, _ = cascade_models(options)
    image_size = _image_size(options.backend, light, heavy)
    settings = HttpSettings(api_key=args.api_key, max_n=args.max_n, image_size=image_size, seed=args.seed,
                            drain_quiet_s=args.drain_quiet_s, drain_max_s=args.drain_max_s)
    sock = bind_socket(args.host, args.port)

    def ready(url: str) -> None:
        where = f" (Ray actors, cluster {options.ray})" if options.ray else ""
        print(f"diffsim serve: {options.cascade} on {options.gpus} {options.backend} worker(s){where}, "
              f"listening on {url}", flush=True)

    started_ray = False
    if options.ray is not None:
        try:
            from ..server import ray_worker
        except ImportError:
            raise DiffsimError("--ray needs Ray: pip install -e '.[ray]'") from None
        # In the main thread, before the event loop: ray.init may install signal handlers.
        started_ray = ray_worker.connect(options.ray, backend=options.backend, workers=options.gpus)

    # SIGTERM during start-up (model loading, profile measurement) stops it cleanly: the workers are
    # stopped and a Ray cluster this process started is shut down. Once serving, the server's own
    # handler takes over and drains (diffsim.server.http.DrainingServer).
    def stop_starting(signum, frame):
        raise _StopStarting()

    signal.signal(signal.SIGTERM, stop_starting)
    try:
        asyncio.run(serve(options, settings, sock, on_ready=ready,
                          log_level="info" if args.log_level == "debug" else "warning"))
    except _StopStarting:
        print("diffsim serve: stopped by SIGTERM before serving", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if started_ray:
            ray_worker.disconnect()
    print("diffsim serve: drained and stopped", file=sys.stderr, flush=True)
    return 0


class _StopStarting(BaseException):
    """SIGTERM arrived before the server was serving (a BaseException: nothing on the way may swallow it)."""


def _image_size(backend: str, light: str, heavy: str):
    """'WxH' when both models make images of one size (what a request's ``size`` must say)."""
    from backends.specs import get_spec

    if backend == "emulated":
        return None  # 8x8 stand-ins: any size a request names is accepted
    size = "tiny" if backend == "cpu-tiny" else "full"
    res = {get_spec(light, size).resolution, get_spec(heavy, size).resolution}
    if len(res) != 1:
        return None
    r = res.pop()
    return f"{r}x{r}"
