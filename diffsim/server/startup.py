"""Start-up of ``diffsim serve``: options, checks, workers, the latency profile, the engine, uvicorn.

This module assembles the layers from :class:`ServeOptions`: it builds the workers, gets the latency
profile the allocator will plan with, builds and starts the engine, and runs uvicorn on a socket.

Latency profile (``gpu_profile``): a shipped name (``a100``) or a profile YAML path is read as is; the
value ``measure`` makes the server time its own batches at start-up on worker 0 -- both models and the
discriminator at every configured batch size, a short warm-up then a few timed calls, the method of
``diffsim profile`` -- and plan with that in-memory profile. ``measure`` is the default on ``cpu-tiny``
(no shipped profile can describe a CPU); ``a100`` is the default on ``cuda`` (the paper's hardware: give
the profile of *your* GPU, e.g. one written by ``diffsim profile`` or ``--save-profile``, or the
allocator plans for the wrong speeds).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from ..config import ControllerConfig, HealthConfig
from ..policies import DEFAULT_MAX_UTILIZATION
from ..errors import DiffsimError, InputError
from .emulation import BACKEND as EMULATED
from .emulation import EmulatedFactory

log = logging.getLogger("diffsim.server")

MEASURE = "measure"
CPU_TINY_BATCH_SIZES = (1, 2, 4)
CUDA_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``diffsim serve`` needs, as plain data."""

    backend: str  # "cuda", "cpu-tiny" or "emulated" (diffsim.server.emulation: profile-timed stand-ins)
    cascade: str
    gpus: int
    policy: str = "diffserve"
    gpu_profile: Optional[str] = None  # a shipped name, a YAML path or "measure"; None: per backend
    cascades: Optional[str] = None  # cascades file (default: the shipped one)
    weights: tuple[str, ...] = ("random",)
    discriminator_weights: Optional[str] = None
    discriminator_arch: Optional[str] = None
    swap: bool = False
    slo_s: Optional[float] = None  # overrides the cascade's SLO
    drop_factor: float = 1.5
    batch_sizes: Optional[tuple[int, ...]] = None  # None: per backend
    static_plan: Optional[dict] = None
    routing: str = "least-loaded"
    max_utilization: float = DEFAULT_MAX_UTILIZATION
    seed: int = 0
    admission: bool = True
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)  # when a worker is taken out, how it comes back
    measure_warmup: int = 1
    measure_iters: int = 3
    save_profile: Optional[str] = None  # write the profile the server plans with
    # Online quality (all off unless fid_reference is given): see diffsim.server.quality_monitor.
    fid_reference: Optional[str] = None  # reference statistics .npz (diffsim quality stats)
    inception_weights: Optional[str] = None  # the Inception-v3 safetensors those statistics were made with
    fid_window_s: float = 60.0
    fid_sample: Optional[int] = None  # images sampled per window (None: twice the feature dimension)
    fid_device: str = "cpu"  # where the Inception features are computed
    queue_model: Optional[str] = None  # the MILP's queueing delay (little | mean | tail), see RunConfig
    tail_quantile: float = 0.99
    fallback: str = "none"  # late deferred requests get their light image ("light"), see RunConfig
    # Workers as Ray actors across a cluster (diffsim.server.ray_worker): "local", "auto" or "host:port".
    ray: Optional[str] = None
    ray_max_restarts: int = -1  # Ray restarts a dead worker actor this many times (-1: always)

    @property
    def profile_source(self) -> str:
        if self.gpu_profile is not None:
            return self.gpu_profile
        return MEASURE if self.backend == "cpu-tiny" else "a100"  # emulated: a100 unless given

    @property
    def sizes(self) -> tuple[int, ...]:
        if self.batch_sizes is not None:
            return tuple(sorted(set(self.batch_sizes)))
        return CPU_TINY_BATCH_SIZES if self.backend == "cpu-tiny" else CUDA_BATCH_SIZES


def cascade_models(options: ServeOptions) -> tuple[str, str, Path]:
    """(light model, heavy model, cascades file) of the cascade the options name."""
    from ..profiles import load_cascades
    from ..resources import profiles_dir

    path = Path(options.cascades) if options.cascades else profiles_dir() / "cascades.yaml"
    cascades = load_cascades(path)
    if options.cascade not in cascades.cascades:
        raise InputError(f"{path}: cascades: no cascade {options.cascade!r} "
                         f"(known: {', '.join(sorted(cascades.cascades))})")
    spec = cascades.cascades[options.cascade]
    return spec.light, spec.heavy, path


def model_weights(options: ServeOptions, light: str, heavy: str) -> dict[str, str]:
    """The weights source per model: one value for both (``random``, ``hub``, a folder of per-model pipeline
    directories, or ``NAME=SOURCE,...``), or two values: the light model's, then the heavy model's."""
    from ..profiling.profiler import weights_for

    values = [w for w in options.weights if w]
    if not values:
        return {light: "random", heavy: "random"}
    if len(values) == 1:
        return weights_for(values[0], (light, heavy))
    if len(values) == 2 and not any("=" in v for v in values):
        return {light: values[0], heavy: values[1]}
    if all("=" in v for v in values):
        return weights_for(",".join(values), (light, heavy))
    raise DiffsimError("--weights: give one source, two (light then heavy), or NAME=SOURCE pairs")


ExecutorFactory = Callable[[int, str, str], object]  # (worker index, role, model) -> unloaded Executor


def default_executor_factory(options: ServeOptions, weights: dict[str, str]) -> ExecutorFactory:
    def make(worker: int, role: str, model: str):
        from backends import make_executor

        return make_executor(
            options.backend, model, weights=weights[model], device=worker,
            discriminator=role == "light",
            discriminator_weights=options.discriminator_weights,
            discriminator_arch=options.discriminator_arch,
        )

    return make


def check_options(options: ServeOptions) -> None:
    """The cheap checks, before any model is loaded: names, files, numbers."""
    from backends.registry import check_backend_and_model

    from ..policies import POLICY_NAMES
    from ..resources import resolve_profile

    if options.gpus < 1:
        raise DiffsimError(f"--gpus: must be >= 1, got {options.gpus}")
    if options.ray is not None and not options.ray.strip():
        raise DiffsimError("--ray: give local, auto or HOST:PORT")
    if options.ray_max_restarts < -1:
        raise DiffsimError(f"--ray-max-restarts: must be >= -1 (-1: always), got {options.ray_max_restarts}")
    if options.policy not in POLICY_NAMES:
        raise DiffsimError(f"--policy: unknown policy {options.policy!r} (choose from {', '.join(POLICY_NAMES)})")
    if options.slo_s is not None and not options.slo_s > 0:
        raise DiffsimError(f"--slo-s: must be > 0, got {options.slo_s}")
    if not options.drop_factor > 0:
        raise DiffsimError(f"--drop-factor: must be > 0, got {options.drop_factor}")
    if any(b < 1 for b in options.sizes):
        raise DiffsimError("--batch-sizes: give positive batch sizes")
    light, heavy, _ = cascade_models(options)
    for model in (light, heavy):
        check_backend_and_model("cuda" if options.backend == EMULATED else options.backend, model)
    model_weights(options, light, heavy)
    if options.backend == EMULATED and options.profile_source == MEASURE:
        raise DiffsimError("--gpu-profile: backend emulated takes its batch times from a profile; "
                           "give a shipped name (e.g. a100) or a profile file, not measure")
    if options.profile_source != MEASURE:
        resolve_profile(options.profile_source)
    if options.discriminator_weights is not None and not Path(options.discriminator_weights).is_file():
        raise InputError(f"{options.discriminator_weights}: no such discriminator weights file")
    check_quality_options(options)


def check_quality_options(options: ServeOptions) -> None:
    """--fid-reference and --inception-weights come together; the statistics must be usable."""
    from .quality_monitor import check_reference

    if options.fid_reference is None:
        if options.inception_weights is not None:
            raise DiffsimError("--inception-weights is for served-image FID: give --fid-reference too")
        return
    if options.inception_weights is None:
        raise DiffsimError("--fid-reference needs --inception-weights (the Inception-v3 the statistics were made "
                           "with)")
    if not options.fid_window_s > 0:
        raise DiffsimError(f"--fid-window-s: must be > 0, got {options.fid_window_s}")
    if options.fid_sample is not None and options.fid_sample < 2:
        raise DiffsimError(f"--fid-sample: must be >= 2, got {options.fid_sample}")
    if not Path(options.inception_weights).is_file():
        raise InputError(f"{options.inception_weights}: no such Inception weights file")
    check_reference(options.fid_reference)


async def build_engine(options: ServeOptions, *, executor_factory: Optional[ExecutorFactory] = None):
    """Workers, latency profile, cascade and a started :class:`~diffsim.server.engine.Engine`."""
    from ..profiling.profiler import validate_profile, write_profile
    from ..profiles import build_cascade, load_cascades, load_gpu_profile
    from ..resources import resolve_profile
    from .engine import Engine, EngineConfig

    check_options(options)
    light, heavy, cascades_path = cascade_models(options)
    weights = model_weights(options, light, heavy)
    measure = options.profile_source == MEASURE
    if not measure:  # read once: the emulated executors take their times from the same cascade
        profile_path = resolve_profile(options.profile_source)
        profile = load_gpu_profile(profile_path)
        cascade = build_cascade(options.cascade, profile, load_cascades(cascades_path), profile_path, cascades_path)
    if executor_factory is None and options.backend == EMULATED:  # never measure (check_options)
        executor_factory = EmulatedFactory(cascade, seed=options.seed)
    factory = executor_factory or default_executor_factory(options, weights)
    models = {"light": light, "heavy": heavy}
    workers = make_workers(options, factory, models)
    timing_swap = options.swap and not measure  # measuring loads both models: it times their loads
    with_quality = options.fid_reference is not None
    # One progress step per await below: building and measuring (measure), timing a swap (timing_swap),
    # the FID reference (with_quality), and the first plan's models.
    progress = StartupProgress(2 * measure + timing_swap + with_quality + 1)
    try:
        sizes = options.sizes
        swap_s = 0.0
        if measure:
            import asyncio

            # Every worker at once: under load they all run, and share the host (see diffsim.profiling.profiler).
            log.info("measuring batch latency on all %d workers at once (batch sizes %s)", len(workers),
                     ", ".join(map(str, sizes)))
            infos = await progress.step(f"building the models on {len(workers)} worker(s)",
                                        asyncio.gather(*(w.start("light") for w in workers)))
            per_worker = await progress.step(
                f"measuring batch latency on {len(workers)} worker(s), batch sizes {', '.join(map(str, sizes))}",
                asyncio.gather(*(w.measure(sizes, options.measure_warmup, options.measure_iters) for w in workers)))
            measured = merge_measurements(per_worker)
            profile = validate_profile(_profile_data(options, measured, infos[0].device, len(workers)),
                                       "measured profile")
            profile_path = "<measured at start-up>"
            swap_s = max(measured["load_s"].values())
        if options.save_profile:
            write_profile(profile, options.save_profile)
        if measure:
            cascade = build_cascade(options.cascade, profile, load_cascades(cascades_path), profile_path,
                                    cascades_path)
        if options.slo_s is not None:
            cascade = replace(cascade, slo_s=float(options.slo_s))
        usable = tuple(b for b in sizes if _has_latency(cascade, b))
        if not usable:
            raise DiffsimError(f"the latency profile ({profile_path}) has no batch size of {list(sizes)} "
                               f"for both {light} and {heavy} and the discriminator")
        if timing_swap:
            # The dispatcher keeps a swapping worker idle for the time a model load takes: time both.
            async def time_swap():
                await workers[0].prepare("heavy")
                return await workers[0].prepare("light")

            info = await progress.step("timing a model swap", time_swap())
            swap_s = max(info.load_s.values(), default=0.0)
        static_plan = options.static_plan
        if static_plan is not None and "gpus" not in static_plan:
            static_plan = {**static_plan, "gpus": options.gpus}  # a plan written for this server
        config = EngineConfig(
            cascade=cascade, gpus=options.gpus, policy=options.policy, static_plan=static_plan,
            controller=options.controller, routing=options.routing, drop_factor=options.drop_factor,
            max_utilization=options.max_utilization,
            batch_sizes=usable, seed=options.seed, swap=options.swap, swap_s=swap_s,
            admission=options.admission, health=options.health,
            queue_model=options.queue_model, tail_quantile=options.tail_quantile, fallback=options.fallback,
        )
        engine = Engine(config, workers)
        monitor = None
        if with_quality:
            import asyncio

            from .quality_monitor import build_quality_monitor

            monitor = await progress.step("loading the FID reference and Inception", asyncio.to_thread(
                build_quality_monitor, options.fid_reference, options.inception_weights,
                clock=lambda: engine.now, window_s=options.fid_window_s, sample=options.fid_sample,
                device=options.fid_device, seed=options.seed))
            engine.attach_quality(monitor)
        await progress.step(f"loading the first plan's models on {len(workers)} worker(s)", engine.start())
        if monitor is not None:
            monitor.start()
    except BaseException:
        progress.close()
        for w in workers:
            try:
                await w.stop()
            except Exception:  # noqa: BLE001 - already failing; stopping is best effort
                pass
        raise
    progress.close()
    return engine


class StartupProgress:
    """serve's start-up on a terminal: one bar of its steps on stderr (:mod:`diffsim.progress`: nothing
    when stderr is not a terminal), naming the step in progress with the time spent so far, redrawn every
    second -- measuring batch latency runs tens of seconds without a step ending."""

    def __init__(self, steps: int):
        import contextlib

        from ..progress import progress_bar

        self.bar = progress_bar(total=steps, desc="serve start-up", unit="step",
                                bar_format="{desc} [{elapsed}; {n_fmt} of {total_fmt} steps done]")
        self._logging = contextlib.ExitStack()
        if not self.bar.disable:  # log lines (serve logs at info) printed above the bar, not through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._logging.enter_context(logging_redirect_tqdm())

    async def step(self, desc: str, awaitable):
        """Await ``awaitable`` as the step named ``desc``; returns its result."""
        import asyncio

        self.bar.set_description_str(f"serve start-up: {desc}")
        ticker = None if self.bar.disable else asyncio.create_task(self._redraw())
        try:
            return await awaitable
        finally:
            if ticker is not None:
                ticker.cancel()
            self.bar.update(1)

    async def _redraw(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(1.0)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self._logging.close()


def make_workers(options: ServeOptions, factory: ExecutorFactory, models: dict[str, str]) -> list:
    """One worker per GPU (CPU slot): threads of this process, or Ray actors with ``--ray``."""
    cuda = options.backend == "cuda"
    if options.ray is None:
        from .worker import ThreadWorker

        return [ThreadWorker(w, (lambda role, w=w: factory(w, role, models[role])), swap=options.swap,
                             device=f"cuda:{w}" if cuda else f"cpu-slot-{w}")
                for w in range(options.gpus)]
    from .ray_worker import RayWorker, check_capacity, connect

    connect(options.ray, backend=options.backend, workers=options.gpus)  # no-op when already connected
    check_capacity(options.ray, options.backend, options.gpus)
    # Inside an actor, Ray makes its one GPU cuda:0.
    return [RayWorker(w, (lambda role, w=w: factory(0 if cuda else w, role, models[role])), backend=options.backend,
                      swap=options.swap, max_restarts=options.ray_max_restarts)
            for w in range(options.gpus)]


def _has_latency(cascade, b: int) -> bool:
    return all(t.latency_ms(b) is not None for t in (cascade.light, cascade.heavy, cascade.discriminator))


def merge_measurements(per_worker: list[dict]) -> dict:
    """One profile from the tables several workers measured at the same time: each percentile the mean of
    the workers' (they sample one distribution), a batch size null where any worker ran out of memory."""
    def merge(tables: list[dict]) -> dict:
        out = {"batch_sizes": tables[0]["batch_sizes"]}
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            columns = zip(*(t[key] for t in tables))
            out[key] = [None if any(v is None for v in col) else round(sum(col) / len(col), 3) for col in columns]
        return out

    first = per_worker[0]
    return {
        "models": {name: merge([m["models"][name] for m in per_worker]) for name in first["models"]},
        "discriminator": merge([m["discriminator"] for m in per_worker]),
        "load_s": {role: max(m["load_s"][role] for m in per_worker) for role in first["load_s"]},
    }


def _profile_data(options: ServeOptions, measured: dict, device: str, concurrency: int = 1) -> dict:
    import datetime as _dt

    gpu = "cpu-tiny" if options.backend == "cpu-tiny" else f"measured-{device.replace(':', '')}"
    return {
        "gpu": gpu,
        "provenance": {
            "source": "diffsim serve start-up measurement",
            "gpu": device,
            "date": _dt.date.today().isoformat(),
            "software": {"backend": options.backend},
            "method": (f"whole-pipeline batch latency on all {concurrency} workers at once, "
                       f"{options.measure_warmup} warm-up then {options.measure_iters} timed calls per batch size "
                       f"(diffsim.profiling.profiler); percentiles averaged over the workers"),
            "notes": "measured by the server itself before serving",
        },
        "models": measured["models"],
        "discriminator": measured["discriminator"],
        "concurrency": concurrency,
    }


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: an ephemeral port; read it back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DiffsimError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(options: ServeOptions, http_settings, sock: socket.socket, *,
                on_ready: Optional[Callable[[str], None]] = None,
                on_server: Optional[Callable[[object], None]] = None,
                executor_factory: Optional[ExecutorFactory] = None,
                log_level: str = "warning") -> None:
    """Build the engine, then serve HTTP on ``sock`` until a drain ends (SIGTERM/SIGINT in the main thread,
    or ``server.request_drain()``: see :class:`~diffsim.server.http.DrainingServer`): while draining the
    socket stays open, new requests get 503 and admitted ones are answered; then this returns.

    The connections accepted on ``sock`` get TCP_NODELAY: asyncio sets it only on sockets it creates
    itself, and without it a response's body, written after its headers, waited for the client's delayed
    ACK -- about 40 ms more on every answer over a kept-alive connection. Idle kept-alive connections are
    kept 30 s, longer than common clients keep theirs (httpx 5 s, aiohttp 15 s, ``diffsim load`` 2 s), so
    the client closes an idle connection first and never sends a request on one the server is closing."""
    import uvicorn

    from .http import DrainingServer, create_app

    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    engine = await build_engine(options, executor_factory=executor_factory)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"

    async def ready():
        if on_ready is not None:
            on_ready(url)
        return engine

    app = create_app(ready, http_settings)
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=engine.default_drain_s() + 5.0)
    server = DrainingServer(config, engine, http_settings.drain_timeout_s, quiet_s=http_settings.drain_quiet_s,
                            max_s=http_settings.drain_max_s)
    if on_server is not None:
        on_server(server)
    try:
        await server.serve(sockets=[sock])
    finally:
        # Already stopped after a drain; a forced exit (second Ctrl-C) or a failure does not wait again.
        await engine.stop(0.0 if server.force_exit or server.drain_requested else http_settings.drain_timeout_s)


class BackgroundServer:
    """:func:`serve` on a thread of its own, for tests and benchmarks: ``start()`` returns the URL once the
    server answers; ``stop()`` shuts it down the way SIGTERM does (in-flight requests answered, drained).
    ``drain()`` starts that shutdown and returns as soon as the server refuses new work (503), so a test
    can look at a draining server; ``stop()`` or ``join()`` then waits for the end."""

    def __init__(self, options: ServeOptions, http_settings=None, *, host: str = "127.0.0.1", port: int = 0,
                 executor_factory: Optional[ExecutorFactory] = None):
        import threading

        from .http import HttpSettings

        self.options = options
        self.http_settings = http_settings or HttpSettings()
        self.host = host
        self.port = port
        self.executor_factory = executor_factory
        self.url: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._server = None
        self._loop = None
        self._stop_requested = False  # stop() before the server existed: drain as soon as it does
        self._lock = threading.Lock()  # guards _server and _stop_requested between the two threads
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="diffsim-server", daemon=True)

    def _main(self) -> None:
        import asyncio

        def ready(url: str) -> None:
            self.url = url
            self._ready.set()

        def on_server(server) -> None:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._server = server
                if self._stop_requested:
                    server.request_drain()

        try:
            sock = bind_socket(self.host, self.port)
            asyncio.run(serve(self.options, self.http_settings, sock, on_ready=ready, on_server=on_server,
                              executor_factory=self.executor_factory))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.error = e
        finally:
            self._ready.set()

    def start(self, timeout_s: float = 180.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the server did not start within {timeout_s:g} s")
        if self.url is None:
            raise RuntimeError(f"the server failed to start: {self.error!r}") from self.error
        return self.url

    def drain(self, timeout_s: float = 60.0) -> None:
        """Start the shutdown SIGTERM starts, and return once new generation requests get 503 (the
        admitted ones are still being answered). A server not yet serving drains as soon as it is."""
        import asyncio
        import concurrent.futures

        with self._lock:
            server, loop = self._server, self._loop
            if server is None:
                self._stop_requested = True
                return
        try:
            asyncio.run_coroutine_threadsafe(server.begin_drain(), loop).result(timeout_s)
        except (RuntimeError, concurrent.futures.CancelledError):
            pass  # the loop closed or is closing: the server is already on its way out

    def join(self, timeout_s: float = 120.0) -> None:
        """Wait for the server's thread to end (after a drain)."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the server did not stop within {timeout_s:g} s")

    def stop(self, timeout_s: float = 120.0) -> None:
        """Drain (as SIGTERM does) and wait until the server has stopped."""
        if self._thread.is_alive():
            self.drain(timeout_s)
        if self._thread.ident is not None:
            self.join(timeout_s)

    @property
    def engine(self):
        """The running engine (read-only use from other threads: its state lives on the server's loop)."""
        server = self._server
        app = getattr(getattr(server, "config", None), "app", None)
        return getattr(getattr(app, "state", None), "engine", None)

    def __enter__(self) -> "BackgroundServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
