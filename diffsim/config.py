"""Run configuration of the controller and the simulator, and the optional YAML config file.

:class:`ControllerConfig` and :class:`SimConfig` are frozen dataclasses shared by ``diffsim simulate``
and (for the controller part) ``diffsim serve``. Values are checked when the object is built; a bad
value raises :class:`~diffsim.errors.InputError` naming the field.

The config file (``diffsim simulate --config FILE``) is YAML with any of these keys, all optional (their
types and bounds, from :mod:`diffsim.limits`, are tabled in README.md, section "Config file")::

    gpu: a100                    # GPU profile name or path (relative paths: relative to the file)
    cascades: cascades.yaml      # cascades file (default: the shipped profiles/cascades.yaml)
    cascade: sdturbo-sdv15
    trace: dynamic.csv           # read by the command, not by SimConfig
    gpus: 16
    policy: diffserve
    seed: 0
    preset: artifact             # settings as the DiffServe artifact has them, under this file's (diffsim/presets.py)
    routing: least-loaded        # or random (the paper's uniform random choice)
    max_utilization: 0.8         # plan each stage to at most this fraction of its capacity
    queue_model: little          # queueing delay the MILP plans with: little (measured), mean or tail (per plan)
    tail_quantile: 0.99          # queue_model tail: plan this quantile of all queries' latency to the SLO
    fallback: none               # or light: a deferred query whose heavy image would be late gets its light one
    demand: arrival              # EWMA of arrival rates, or in-system (queries not yet ended, the artifact's)
    batch_wait: 0                # fraction of a batch time counted as waiting for the batch in flight
    drop_factor: 1.5
    batch_timeout_s: 0
    swap_s: 0
    batch_sizes: [1, 2, 4, 8, 16, 32]
    confidences: conf.csv        # per-prompt confidences, CSV prompt_id,confidence
    static_plan: {threshold: 0.02, light_workers: 4, heavy_workers: 12, light_batch: 16, heavy_batch: 4}
    window_s: 10
    controller: {tick_s: 1, replan_s: 5, ewma_alpha: 0.3226, ewma_window: 20, headroom: 1.05,
                 initial_demand_qps: 10, stabilization_s: 60}
    service_time: p50            # or sampled: batch times drawn around p50 from the profile's p95/p99
    admission: false             # true: refuse at the door what cannot finish in time, as diffsim serve does
    deadline_sweep_s: 0          # > 0: drop queued queries whose time is up this often (the server: 0.1)
    faults:                      # workers lost (their running batch served again elsewhere) and back
      - {at_s: 120, workers: [2, 3]}
      - {at_s: 180, workers: [2, 3], recover: true}

:func:`read_config_file` validates the file and returns only the keys it gives (paths resolved), so a
command can layer defaults < file < command-line flags and then call :func:`build_sim_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import limits
from .errors import InputError, SettingError
from .policies import DEFAULT_MAX_UTILIZATION, StaticPlanSpec
from .profiles import Cascade, load_cascade, validation_message
from .resources import profiles_dir, resolve_profile
from .runtime.demand import DEMAND_KINDS
from .runtime.batching import FALLBACKS
from .runtime.queueing import DEFAULT_TAIL_QUANTILE, QUEUE_MODELS
from .runtime.routing import ROUTING_KINDS
from .yamlfile import read_yaml

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SettingError(name, f"must be a number > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise SettingError(name, f"must be a number >= 0, got {value!r}")


def _within(name: str, value: object, bounds: limits.Range) -> None:
    """A setting inside its bounds (:mod:`diffsim.limits`); booleans are not numbers."""
    if not bounds.contains(value):
        raise SettingError(name, f"must be {bounds.describe()}, got {value!r}")


@dataclass(frozen=True)
class ControllerConfig:
    """The control loop: tick period, re-plan period, demand estimator.

    ``ewma_alpha`` and ``ewma_window``: the demand estimate is the bias-corrected EWMA (pandas
    ``adjust=True``) of the last ``ewma_window`` one-tick arrival-rate samples, as in the DiffServe
    artifact (com=2.1, i.e. alpha=1/3.1, over 20 samples). ``headroom`` multiplies it.

    ``initial_demand_qps``: the demand the very first plan (at t=0, before any arrival was seen) is
    made for; nothing of the trace is looked at in advance. Because that is a guess, the controller
    re-plans at the first tick and every ``replan_s`` after it (see :mod:`diffsim.runtime.controller`).

    ``demand``: what the EWMA is taken of, one sample per tick: ``arrival`` (the tick's arrival rate,
    diffsim's default) or ``in-system`` (queries admitted and not yet ended, the DiffServe artifact's
    estimator, which it multiplies by 1.2: give ``headroom`` 1.2 with it, as ``--preset artifact`` does).
    See :mod:`diffsim.runtime.demand`.

    ``stabilization_s``: each re-plan also tells the policy the highest demand it planned for over this
    many seconds (this re-plan's included); with a plan-dependent delay the MILP policies move GPUs between
    the stages only to a split that carries that demand too, while the split in force carries the present
    one (:meth:`diffsim.policies.MilpPolicy._keep_split`). 0: the present demand only.
    """

    tick_s: float = 1.0
    replan_s: float = 5.0
    ewma_alpha: float = 1 / 3.1
    headroom: float = 1.05
    ewma_window: int = 20
    initial_demand_qps: float = 10.0
    demand: str = "arrival"
    stabilization_s: float = 60.0

    def __post_init__(self) -> None:
        if self.demand not in DEMAND_KINDS:
            raise SettingError("demand", f"must be one of {', '.join(DEMAND_KINDS)}, got {self.demand!r}")
        _within("controller.tick_s", self.tick_s, limits.TICK_S)
        _within("controller.replan_s", self.replan_s, limits.REPLAN_S)
        _within("controller.ewma_alpha", self.ewma_alpha, limits.FRACTION_ABOVE_0)
        _within("controller.headroom", self.headroom, limits.HEADROOM)
        _within("controller.ewma_window", self.ewma_window, limits.EWMA_WINDOW)
        _within("controller.initial_demand_qps", self.initial_demand_qps, limits.DEMAND_QPS)
        _within("controller.stabilization_s", self.stabilization_s, limits.STABILIZATION_S)


@dataclass(frozen=True)
class HealthConfig:
    """When a worker is taken out of service and how it comes back (:mod:`diffsim.runtime.health`).

    ``max_failures``: executor errors in a row that take a worker out; ``probe_s``: how often a worker
    out of service is probed; a batch still running after ``max(stall_min_s, stall_factor x its profile
    time)`` means its worker is lost.
    """

    max_failures: int = 3
    probe_s: float = 5.0
    stall_factor: float = 10.0
    stall_min_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_failures, int) or isinstance(self.max_failures, bool) or self.max_failures < 1:
            raise InputError(f"config: health.max_failures: must be an integer >= 1, got {self.max_failures!r}")
        _positive("health.probe_s", self.probe_s)
        _positive("health.stall_factor", self.stall_factor)
        _positive("health.stall_min_s", self.stall_min_s)


@dataclass(frozen=True)
class WorkerFault:
    """A simulated fault: ``workers`` leave service at ``at_s`` (``recover=False``: lost, with the batch
    they run) or come back (``recover=True``). Several workers at once model a node."""

    at_s: float
    workers: tuple[int, ...]
    recover: bool = False

    def __post_init__(self) -> None:
        _within("faults.at_s", self.at_s, limits.SECONDS)
        if not self.workers or not all(limits.WORKER_INDEX.contains(w) for w in self.workers):
            raise SettingError("faults.workers", f"must be worker indices >= 0, got {list(self.workers)!r}")


def parse_fault(text: str, recover: bool, flag: str) -> WorkerFault:
    """``W[,W...]@T`` (workers, then the simulated second), as ``--fail-worker`` and ``--recover-worker`` take."""
    workers, sep, at = text.partition("@")
    try:
        if not sep:
            raise ValueError
        fault = WorkerFault(float(at), tuple(int(w) for w in workers.split(",")), recover)
    except (ValueError, InputError):
        raise InputError(f"{flag}: expected WORKER[,WORKER...]@SECONDS (e.g. 3@120 or 2,3@120), got {text!r}") from None
    return fault


@dataclass(frozen=True)
class RunConfig:
    """What a simulated run and a served one share: the cascade, the GPUs and every policy-side setting.

    :class:`SimConfig` (the simulator) and the server's ``EngineConfig`` extend it, so each rule about
    these fields (defaults, validation, how the policy is built: :func:`diffsim.policies.policy_for`) is
    written once.
    """

    cascade: Cascade
    gpus: int = 16
    policy: str = "diffserve"
    seed: int = 0
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    routing: str = "least-loaded"  # or "random" (the paper's)
    drop_factor: float = 1.5
    batch_timeout_s: float = 0.0
    swap_s: float = 0.0
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    static_plan: Optional[dict] = None
    max_utilization: float = DEFAULT_MAX_UTILIZATION  # plan stages to at most this fraction of capacity
    batch_wait: float = 0.0  # fraction of a batch time counted as waiting for the batch in flight
    health: HealthConfig = field(default_factory=HealthConfig)
    # The server's promises (diffsim.runtime.admission): refuse at the door what cannot finish within
    # drop_factor x SLO, and answer queued queries when their time is up (every deadline_sweep_s; 0: only
    # when they reach a worker). On by default in the server; off by default in the simulator (the paper's
    # system has neither), on when it must predict a server (diffsim validate).
    admission: bool = False
    deadline_sweep_s: float = 0.0
    # The queueing delay the MILP policies plan with (diffsim.allocator): "little" (one delay measured under
    # the plan in force, the artifact's), "mean" or "tail" (computed per candidate plan,
    # diffsim.runtime.queueing); None: the policy's own default (diffsim.policies.DEFAULT_QUEUE_MODEL).
    queue_model: Optional[str] = None
    tail_quantile: float = DEFAULT_TAIL_QUANTILE  # "tail": this quantile of all queries' latency meets the SLO
    # What a deferred query whose heavy image could not be ready by its SLO deadline gets: "none" (served
    # late by the heavy model, or dropped) or "light" (its light image, on time; diffsim.runtime.batching).
    # With "light" and a plan-dependent delay the MILP policies plan the heavy stage to its capacity
    # (diffsim.allocator: its waits cost images served light, not violations).
    fallback: str = "none"

    def __post_init__(self) -> None:
        _within("gpus", self.gpus, limits.GPUS)
        if self.fallback not in FALLBACKS:
            raise SettingError("fallback", f"must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if self.queue_model is not None and self.queue_model not in QUEUE_MODELS:
            raise SettingError("queue_model", f"must be one of {', '.join(QUEUE_MODELS)}, got {self.queue_model!r}")
        _within("tail_quantile", self.tail_quantile, limits.QUANTILE)
        _within("seed", self.seed, limits.SEED)
        if self.routing not in ROUTING_KINDS:
            raise SettingError("routing", f"must be one of {', '.join(ROUTING_KINDS)}, got {self.routing!r}")
        _within("drop_factor", self.drop_factor, limits.DROP_FACTOR)
        _within("batch_timeout_s", self.batch_timeout_s, limits.DELAY_S)
        _within("swap_s", self.swap_s, limits.DELAY_S)
        _within("deadline_sweep_s", self.deadline_sweep_s, limits.SECONDS)
        if 0 < self.deadline_sweep_s < limits.MIN_PERIOD_S:  # a sweep every nanosecond would never end a run
            raise SettingError("deadline_sweep_s", f"must be 0 (off) or at least {limits.MIN_PERIOD_S} s, "
                               f"got {self.deadline_sweep_s!r}")
        if not limits.FRACTION_ABOVE_0.contains(self.max_utilization):
            raise SettingError("max_utilization", f"must lie in (0, 1], got {self.max_utilization!r}")
        if not limits.FRACTION.contains(self.batch_wait):
            raise SettingError("batch_wait", f"must lie in [0, 1], got {self.batch_wait!r}")
        sizes = tuple(self.batch_sizes)
        if not sizes or len(sizes) > limits.MAX_BATCH_SIZES or not all(limits.BATCH_SIZE.contains(b) for b in sizes):
            raise SettingError("batch_sizes", f"must be 1 to {limits.MAX_BATCH_SIZES} integers in "
                               f"{limits.BATCH_SIZE}, got {list(sizes)!r}")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))
        if self.static_plan is not None:
            try:  # here, not when the policy is built mid-run: a plan needing more GPUs than it is for
                StaticPlanSpec.from_dict(self.static_plan, error=ValueError)
            except ValueError as e:
                raise SettingError("static_plan", str(e).removeprefix("static plan: ")) from None
        if not isinstance(self.controller, ControllerConfig):
            raise InputError("config: controller: must be a ControllerConfig")


@dataclass(frozen=True)
class SimConfig(RunConfig):
    """Everything one simulation run depends on (with the trace); same config + trace -> same result."""

    confidences_path: Optional[Path] = None
    window_s: float = 10.0
    faults: tuple[WorkerFault, ...] = ()  # workers lost and brought back at given times
    service_time: str = "p50"  # "sampled": batch times drawn around the profile's p50 (runtime/service_time.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        _within("window_s", self.window_s, limits.WINDOW_S)
        if self.service_time not in ("p50", "sampled"):
            raise InputError(f"config: service_time: must be p50 or sampled, got {self.service_time!r}")
        for fault in self.faults:
            if max(fault.workers) >= self.gpus:
                raise SettingError("faults", f"worker {max(fault.workers)} does not exist "
                                   f"(with {self.gpus} GPUs the workers are 0..{self.gpus - 1})")
        object.__setattr__(self, "faults", tuple(sorted(self.faults, key=lambda f: f.at_s)))
        if self.confidences_path is not None:
            object.__setattr__(self, "confidences_path", Path(self.confidences_path))


# ----------------------------------------------------------------------------------------------
# The YAML config file


class _Strict(BaseModel):
    # strict: a boolean is not a number (gpus: true is an error, not 1 GPU), a quoted "16" is not an
    # integer, and no number may be infinite or NaN. The bounds are those of diffsim.limits.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _bounded(bounds: limits.Range, **kwargs):
    """A pydantic field with the bounds of ``bounds`` (default None: the setting is optional)."""
    kwargs.setdefault("default", None)
    return Field(**kwargs, **bounds.pydantic())


_Name = Annotated[str, Field(min_length=1)]
_BatchSize = Annotated[int, Field(**limits.BATCH_SIZE.pydantic())]
_WorkerIndex = Annotated[int, Field(**limits.WORKER_INDEX.pydantic())]


class ControllerSection(_Strict):
    tick_s: Optional[float] = _bounded(limits.TICK_S)
    replan_s: Optional[float] = _bounded(limits.REPLAN_S)
    ewma_alpha: Optional[float] = _bounded(limits.FRACTION_ABOVE_0)
    ewma_window: Optional[int] = _bounded(limits.EWMA_WINDOW)
    headroom: Optional[float] = _bounded(limits.HEADROOM)
    initial_demand_qps: Optional[float] = _bounded(limits.DEMAND_QPS)
    stabilization_s: Optional[float] = _bounded(limits.STABILIZATION_S)


class FaultSection(_Strict):
    at_s: float = _bounded(limits.SECONDS, default=...)
    workers: list[_WorkerIndex] = Field(min_length=1)
    recover: bool = False


class StaticPlanSection(_Strict):
    """A fixed plan for the ``static`` policy, written for ``gpus`` GPUs (default 16, the paper's) and
    scaled to the run's GPU count."""

    threshold: float = _bounded(limits.FRACTION, default=...)
    light_workers: int = _bounded(limits.WORKERS, default=...)
    heavy_workers: int = _bounded(limits.WORKERS, default=...)
    light_batch: _BatchSize
    heavy_batch: _BatchSize
    gpus: Optional[int] = _bounded(limits.GPUS)

    @model_validator(mode="after")
    def _fits(self) -> "StaticPlanSection":
        try:
            StaticPlanSpec.from_dict(self.model_dump(exclude_none=True), error=ValueError)
        except ValueError as e:
            raise ValueError(str(e).removeprefix("static plan: ")) from None
        return self


class ConfigFile(_Strict):
    gpu: Optional[_Name] = None
    cascades: Optional[_Name] = None
    cascade: Optional[_Name] = None
    trace: Optional[_Name] = None
    gpus: Optional[int] = _bounded(limits.GPUS)
    policy: Optional[_Name] = None
    seed: Optional[int] = _bounded(limits.SEED)
    routing: Optional[_Name] = None
    drop_factor: Optional[float] = _bounded(limits.DROP_FACTOR)
    batch_timeout_s: Optional[float] = _bounded(limits.DELAY_S)
    swap_s: Optional[float] = _bounded(limits.DELAY_S)
    batch_sizes: Optional[list[_BatchSize]] = Field(default=None, min_length=1, max_length=limits.MAX_BATCH_SIZES)
    confidences: Optional[_Name] = None
    static_plan: Optional[StaticPlanSection] = None
    window_s: Optional[float] = _bounded(limits.WINDOW_S)
    max_utilization: Optional[float] = _bounded(limits.FRACTION_ABOVE_0)
    batch_wait: Optional[float] = _bounded(limits.FRACTION)
    controller: Optional[ControllerSection] = None
    faults: Optional[list[FaultSection]] = None
    service_time: Optional[Literal["p50", "sampled"]] = None
    admission: Optional[bool] = None
    deadline_sweep_s: Optional[float] = _bounded(limits.SECONDS)
    preset: Optional[_Name] = None
    queue_model: Optional[Literal["little", "mean", "tail"]] = None
    tail_quantile: Optional[float] = _bounded(limits.QUANTILE)
    fallback: Optional[Literal["none", "light"]] = None
    demand: Optional[Literal["arrival", "in-system"]] = None


_PATH_KEYS = ("cascades", "trace", "confidences")


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The settings a config file gives (only those), validated; relative paths resolved against it.

    ``gpu`` is resolved only when it names a file next to the config (``a100`` stays a profile name).
    """
    path = Path(path)
    data = read_yaml(path)  # not UTF-8, bad syntax or a key given twice: one line naming the file and line
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: (top level): expected a mapping of settings, got {type(data).__name__}")
    try:
        parsed = ConfigFile.model_validate(data)
    except ValidationError as e:
        raise InputError(validation_message(path, e)) from None
    settings = parsed.model_dump(exclude_none=True)
    if parsed.controller is not None:
        settings["controller"] = parsed.controller.model_dump(exclude_none=True)
    if parsed.faults is not None:
        settings["faults"] = [f.model_dump() for f in parsed.faults]
    base = path.parent
    for key in _PATH_KEYS:
        if key in settings and not Path(settings[key]).is_absolute():
            settings[key] = str(base / settings[key])
    gpu = settings.get("gpu")
    if gpu is not None and (gpu.endswith((".yaml", ".yml")) or "/" in gpu) and not Path(gpu).is_absolute():
        settings["gpu"] = str(base / gpu)
    try:
        check_settings(settings)
    except InputError as e:
        raise InputError(f"{path}: {str(e).removeprefix('config: ')}") from None
    return settings


def check_settings(settings: dict[str, Any]) -> None:
    """Checks that need more than the field types: known routing kind and policy name."""
    routing = settings.get("routing")
    if routing is not None and routing not in ROUTING_KINDS:
        raise SettingError("routing", f"must be one of {', '.join(ROUTING_KINDS)}, got {routing!r}")
    policy = settings.get("policy")
    if policy is not None:
        try:
            from .policies import POLICY_NAMES
        except ImportError:  # policies not importable: make_policy checks the name later
            return
        if policy not in POLICY_NAMES:
            raise SettingError("policy", f"unknown policy {policy!r} (choose from {', '.join(POLICY_NAMES)})")


def build_sim_config(settings: dict[str, Any]) -> SimConfig:
    """A :class:`SimConfig` from merged settings (the keys of the config file; unknown keys are an error).

    Defaults: GPU profile ``a100``, the shipped cascades file, cascade ``sdturbo-sdv15``. ``trace`` is
    ignored here (the command reads it). A ``preset`` fills in what the settings do not give
    (:func:`diffsim.presets.apply_preset`); ``demand`` is the controller's estimator.
    """
    known = set(ConfigFile.model_fields)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"config: {unknown[0]}: unknown setting")
    from .presets import apply_preset

    settings = apply_preset(settings.get("preset"), settings)
    check_settings(settings)
    profile = resolve_profile(str(settings.get("gpu", "a100")))
    cascades = settings.get("cascades") or str(profiles_dir() / "cascades.yaml")
    cascade = load_cascade(settings.get("cascade", "sdturbo-sdv15"), profile, cascades)
    ctrl_fields = {f.name for f in fields(ControllerConfig)}
    ctrl = dict(settings.get("controller") or {})
    bad = sorted(set(ctrl) - ctrl_fields)
    if bad:
        raise InputError(f"config: controller.{bad[0]}: unknown setting")
    if "ewma_window" in ctrl:
        ctrl["ewma_window"] = int(ctrl["ewma_window"])
    if "demand" in settings:
        ctrl["demand"] = settings["demand"]
    kwargs: dict[str, Any] = {"cascade": cascade, "controller": ControllerConfig(**ctrl)}
    for key in ("gpus", "policy", "seed", "routing", "drop_factor", "batch_timeout_s", "swap_s", "window_s",
                "static_plan", "max_utilization", "batch_wait", "service_time", "admission", "deadline_sweep_s",
                "queue_model", "tail_quantile", "fallback"):
        if key in settings:
            kwargs[key] = settings[key]
    if "batch_sizes" in settings:
        kwargs["batch_sizes"] = tuple(int(b) for b in settings["batch_sizes"])
    if "confidences" in settings:
        kwargs["confidences_path"] = Path(settings["confidences"])
    if settings.get("faults"):
        kwargs["faults"] = tuple(
            WorkerFault(float(f["at_s"]), tuple(int(w) for w in f["workers"]), bool(f.get("recover", False)))
            for f in settings["faults"])
    return SimConfig(**kwargs)
