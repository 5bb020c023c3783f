"""Latency and quality profiles, loaded from YAML into typed, validated objects.

Two kinds of file:

* a **GPU profile** (``profiles/a100.yaml``, ``profiles/h100-eager.yaml``, ...): per model, the latency
  of one whole-pipeline batch for each measured batch size (p50, and p95/p99 where measured), the
  discriminator's latency per batch, and provenance (source, GPU, software, date);
* a **cascades file** (``profiles/cascades.yaml``, or one written by ``diffsim calibrate``): per cascade,
  the light and heavy model, the SLO, the deferral curve f(t) and the FID of the served mix against the
  light-served fraction r.

Latency between measured batch sizes follows one documented rule (:meth:`LatencyTable.latency_ms`):
linear interpolation between the two nearest measured batch sizes; nothing is extrapolated, so a batch
size above the largest measured one (or one whose measurement is ``null``: did not fit) is unavailable.

Bad files raise :class:`~diffsim.errors.InputError` with one line naming the file and the field.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import limits
from .errors import InputError
from .yamlfile import read_yaml

QUANTILES = ("p50", "p95", "p99")


class _Strict(BaseModel):
    # strict: a boolean is not a number and a quoted "16" is not an integer; infinities and NaN are no latency
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Provenance(_Strict):
    source: str = Field(min_length=1)
    gpu: str = Field(min_length=1)
    date: str = Field(min_length=1)
    software: dict[str, str] = Field(default_factory=dict)
    method: str = ""
    notes: str = ""


def _check_series(name: str, values: Optional[list], n: int) -> None:
    if values is None:
        return
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values but batch_sizes has {n}")
    for v in values:
        if v is not None and not limits.LATENCY_MS.contains(v):
            raise ValueError(f"{name} values must be positive milliseconds, from {limits.LATENCY_MS.lo} to "
                             f"{limits.LATENCY_MS.hi:.0f} (or null), got {v}")


class LatencyTable(_Strict):
    """Latency of one batch, per measured batch size. ``null`` means the batch does not fit / was not run."""

    batch_sizes: list[int] = Field(min_length=1)
    p50_ms: list[Optional[float]]
    p95_ms: Optional[list[Optional[float]]] = None
    p99_ms: Optional[list[Optional[float]]] = None
    peak_mem_gib: Optional[list[Optional[float]]] = None

    @field_validator("batch_sizes")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not all(limits.BATCH_SIZE.contains(b) for b in v):
            raise ValueError(f"batch sizes must be integers in {limits.BATCH_SIZE}")
        if any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError("batch sizes must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> "LatencyTable":
        n = len(self.batch_sizes)
        for name in ("p50_ms", "p95_ms", "p99_ms"):
            _check_series(name, getattr(self, name), n)
        if self.peak_mem_gib is not None and len(self.peak_mem_gib) != n:
            raise ValueError(f"peak_mem_gib has {len(self.peak_mem_gib)} values but batch_sizes has {n}")
        if all(v is None for v in self.p50_ms):
            raise ValueError("p50_ms has no measured value")
        return self

    def latency_ms(self, batch_size: int, quantile: str = "p50") -> Optional[float]:
        """Latency of a batch of ``batch_size`` in ms, or None when it is unavailable.

        Rule: a measured batch size gives its value; a batch size strictly between two measured ones
        (both non-null) is linearly interpolated in the batch size; below the smallest or above the
        largest measured one, or next to a ``null``, it is unavailable (never extrapolated).
        A quantile that was not measured falls back to p50.
        """
        series = getattr(self, f"{quantile}_ms", None) or self.p50_ms
        sizes = self.batch_sizes
        i = bisect.bisect_left(sizes, batch_size)
        if i < len(sizes) and sizes[i] == batch_size:
            return series[i]
        if i == 0 or i == len(sizes):
            return None
        lo, hi = series[i - 1], series[i]
        if lo is None or hi is None:
            return None
        b0, b1 = sizes[i - 1], sizes[i]
        return lo + (hi - lo) * (batch_size - b0) / (b1 - b0)

    def max_batch_size(self) -> int:
        return max(b for b, v in zip(self.batch_sizes, self.p50_ms) if v is not None)

    def min_batch_size(self) -> int:
        return min(b for b, v in zip(self.batch_sizes, self.p50_ms) if v is not None)


class Overheads(_Strict):
    """What a served request pays outside the batches, for the simulator to add (``diffsim validate`` and
    ``diffsim load`` measure them): ``request_ms``, the median over requests of the client's send to its
    receipt minus the server's own time for the request (HTTP, JSON and base64, the network, the event
    loop), with its spread as ``request_p95_ms`` / ``request_p99_ms`` where measured (``--service-time
    sampled`` draws each request's overhead from a log-normal fitted to them); ``cold_start_s``, how much
    longer each worker's first batch takes than the profile says (a fresh process warming up)."""

    request_ms: float = Field(default=0.0, ge=0, le=limits.LATENCY_MS.hi)
    request_p95_ms: Optional[float] = Field(default=None, ge=0, le=limits.LATENCY_MS.hi)
    request_p99_ms: Optional[float] = Field(default=None, ge=0, le=limits.LATENCY_MS.hi)
    cold_start_s: float = Field(default=0.0, ge=0, le=limits.SECONDS.hi)

    @field_validator("request_p95_ms", "request_p99_ms")
    @classmethod
    def _ordered(cls, v: Optional[float], info) -> Optional[float]:
        """p50 <= p95 <= p99: each percentile at least the ones below it that are given."""
        if v is None:
            return v
        for below in ("request_ms", "request_p95_ms"):
            if below == info.field_name:
                break
            lower = info.data.get(below)
            if lower is not None and v < lower:
                raise ValueError(f"must be at least {below} ({lower:g}), got {v:g}")
        return v


class BatchTimeCorrelation(_Strict):
    """How a host's batch times hang together in time, for ``--service-time sampled``: on a shared or
    contended host a batch is slow when the one before it was (other processes, the server's own event
    loop), so slow spells build queues that independent draws spread thin. The log of a batch's time
    around its median is ``sqrt(share) x slow + sqrt(1 - share) x noise``, ``slow`` correlated ``rho`` from
    one batch to the next (``diffsim validate`` measures both from a run's batches); the p50 / p95 / p99
    per batch are those of the latency tables either way."""

    share: float = Field(ge=0, le=1)
    rho: float = Field(ge=0, le=0.999)


def idle_class(gaps_s, idle_s: float) -> int:
    """The class of a host idle time: the index of the last of ``gaps_s`` (ascending, the first 0) at or
    below ``idle_s`` (:class:`BatchTimeContention`'s idle classes)."""
    return bisect.bisect_right(gaps_s, idle_s) - 1


class BatchTimeContention(_Strict):
    """How a host's batch times depend on how many workers are running batches at once, for
    ``--service-time sampled``: workers that share a host's CPU cores, memory bandwidth or PCIe (the
    event loop too, in one server process) slow each other down. ``factors[k - 1]``: the multiplier of
    the latency tables' times for a batch that starts while k workers (itself included) are running; a
    k past the list takes its last factor. ``diffsim validate`` measures them from a run's batches and
    calibrates the tables on the batch times divided by them, so that only the factors' ratios to one
    another carry meaning there: the product keeps the run's times.

    ``idle_gaps_s`` / ``idle_factors`` (optional, together): for a batch that starts with no other worker
    running, the factor by how long the host had been idle before it -- ``idle_factors[i]`` from
    ``idle_gaps_s[i]`` seconds on (ascending, the first 0) -- in place of the first factor. A host kept
    busy runs faster than one woken from idle (CPU and GPU clocks, caches, thread pools that went to
    sleep): on a 2-core host a lone batch after 0.1-0.5 s of idle ran up to 2.3x as long as one started
    back to back."""

    factors: list[float] = Field(min_length=1, max_length=limits.JOBS.hi)

    @field_validator("factors")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not all(0 < f <= 100 for f in v):
            raise ValueError(f"factors must lie in (0, 100], got {v}")
        return v

    idle_gaps_s: Optional[list[float]] = Field(default=None, min_length=1, max_length=16)
    idle_factors: Optional[list[float]] = Field(default=None, min_length=1, max_length=16)

    @model_validator(mode="after")
    def _idle(self) -> "BatchTimeContention":
        gaps, factors = self.idle_gaps_s, self.idle_factors
        if gaps is None and factors is None:
            return self
        if gaps is None or factors is None:
            raise ValueError("idle_gaps_s and idle_factors go together")
        if gaps[0] != 0 or any(b <= a for a, b in zip(gaps, gaps[1:])):
            raise ValueError(f"idle_gaps_s must start at 0 and increase, got {gaps}")
        if len(factors) != len(gaps):
            raise ValueError(f"idle_factors must give one value per idle gap ({len(gaps)}), got {len(factors)}")
        if not all(0 < f <= 100 for f in factors):
            raise ValueError(f"idle_factors must lie in (0, 100], got {factors}")
        return self

    def at(self, busy: int, idle_s: float = 0.0) -> float:
        """The factor for a batch starting while ``busy`` workers run (itself included), ``idle_s`` after
        the host's last batch ended (with no other running)."""
        if busy <= 1 and self.idle_gaps_s is not None:
            return self.idle_factors[idle_class(self.idle_gaps_s, idle_s)]
        return self.factors[min(max(busy, 1), len(self.factors)) - 1]


class GpuProfile(_Strict):
    """Per-GPU latency profile: every model's batch latency plus the discriminator's."""

    gpu: str = Field(min_length=1)
    provenance: Provenance
    models: dict[str, LatencyTable] = Field(min_length=1)
    discriminator: LatencyTable
    # How many workers were busy at once while it was measured (diffsim profile --concurrency; the server's
    # start-up measurement uses all its workers): under load every worker is busy, and shares the host.
    concurrency: int = Field(default=1, ge=1, le=limits.JOBS.hi)
    overheads: Overheads = Field(default_factory=Overheads)
    batch_time_correlation: Optional[BatchTimeCorrelation] = None
    batch_time_contention: Optional[BatchTimeContention] = None


class Curve(_Strict):
    x: list[float] = Field(min_length=2)
    y: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _shape(self) -> "Curve":
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} values but y has {len(self.y)}")
        if any(a >= b for a, b in zip(self.x, self.x[1:])):
            raise ValueError("x must be strictly increasing")
        if self.x[0] != 0 or self.x[-1] != 1:
            raise ValueError("x must run from 0 to 1")
        return self

    def __call__(self, x: float) -> float:
        xs, ys = self.x, self.y
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


class DeferralCurve(_Strict):
    """f(t): fraction of queries whose discriminator confidence is below the threshold t."""

    t: list[float] = Field(min_length=2)
    f: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _shape(self) -> "DeferralCurve":
        Curve(x=self.t, y=self.f)  # same shape rules
        if any(not 0 <= v <= 1 for v in self.f):
            raise ValueError("f values must lie in [0, 1]")
        if any(a > b for a, b in zip(self.f, self.f[1:])):
            raise ValueError("f must be non-decreasing in t")
        return self

    @cached_property
    def curve(self) -> Curve:
        return Curve(x=self.t, y=self.f)

    def __call__(self, t: float) -> float:
        return self.curve(t)

    def inverse(self, u: float) -> float:
        """The smallest threshold t with f(t) >= u (the confidence quantile), for sampling by inverse CDF."""
        if u <= self.f[0]:
            return self.t[0]
        i = bisect.bisect_left(self.f, u)
        if i >= len(self.f):
            return self.t[-1]
        f0, f1 = self.f[i - 1], self.f[i]
        t0, t1 = self.t[i - 1], self.t[i]
        return t1 if f1 == f0 else t0 + (t1 - t0) * (u - f0) / (f1 - f0)


class FidCurve(_Strict):
    """FID of the served mix against the light-served fraction r."""

    r: list[float] = Field(min_length=2)
    fid: list[float] = Field(min_length=2)
    sample_size: Optional[int] = None

    @model_validator(mode="after")
    def _shape(self) -> "FidCurve":
        Curve(x=self.r, y=self.fid)
        if any(v < 0 for v in self.fid):
            raise ValueError("FID values must be >= 0")
        return self

    @cached_property
    def curve(self) -> Curve:
        return Curve(x=self.r, y=self.fid)

    def __call__(self, r: float) -> float:
        return self.curve(r)


class CascadeSpec(_Strict):
    light: str = Field(min_length=1)
    heavy: str = Field(min_length=1)
    slo_s: float = Field(**limits.SLO_S.pydantic())
    deferral_curve: DeferralCurve
    fid: FidCurve
    # FID of a query-agnostic (random) mix, as Proteus serves; when absent, the straight line
    # between the all-heavy and all-light FIDs is used (see Cascade.random_mix_fid).
    fid_random_mix: Optional[FidCurve] = None
    # Optional per-prompt confidences (CSV prompt_id,confidence), relative to this file.
    confidences: Optional[str] = None


class CascadesFile(_Strict):
    provenance: Provenance
    cascades: dict[str, CascadeSpec] = Field(min_length=1)


# ----------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> object:
    """The file's YAML; not UTF-8, bad syntax or a key given twice is an error naming the file and line."""
    return read_yaml(path)


def validation_message(path: Path | str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "missing required field"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field (not permitted here)"
    return f"{path}: {loc}: {msg}"


def _parse(path: Path, model: type[BaseModel]):
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: (top level): expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InputError(validation_message(path, e)) from None


def load_gpu_profile(path: Path | str) -> GpuProfile:
    return _parse(Path(path), GpuProfile)


def load_cascades(path: Path | str) -> CascadesFile:
    return _parse(Path(path), CascadesFile)


@dataclass(frozen=True)
class Cascade:
    """Everything the allocator and the drivers need about one cascade on one GPU kind."""

    name: str
    slo_s: float
    light_model: str
    heavy_model: str
    light: LatencyTable
    heavy: LatencyTable
    discriminator: LatencyTable
    deferral: DeferralCurve
    fid: FidCurve
    fid_random: Optional[FidCurve]
    gpu: str
    confidences_path: Optional[Path] = None
    overheads: Overheads = field(default_factory=Overheads)
    batch_time_correlation: Optional[BatchTimeCorrelation] = None
    batch_time_contention: Optional[BatchTimeContention] = None

    def random_mix_fid(self, light_share: float) -> float:
        """FID when a random ``light_share`` of queries is served light (no discriminator).

        Read from ``fid_random_mix`` where the profile has it, else the straight line between the
        all-heavy and the all-light FID (a random mix has no easy-prompt selection to gain from).
        """
        if self.fid_random is not None:
            return self.fid_random(light_share)
        return self.fid(0.0) + (self.fid(1.0) - self.fid(0.0)) * light_share


def load_cascade(name: str, gpu_profile: Path | str, cascades_file: Path | str) -> Cascade:
    profile = load_gpu_profile(gpu_profile)
    cascades = load_cascades(cascades_file)
    return build_cascade(name, profile, cascades, gpu_profile, cascades_file)


def build_cascade(
    name: str,
    profile: GpuProfile,
    cascades: CascadesFile,
    profile_path: Path | str = "<profile>",
    cascades_path: Path | str = "<cascades>",
) -> Cascade:
    if name not in cascades.cascades:
        raise InputError(
            f"{cascades_path}: cascades: no cascade {name!r} (known: {', '.join(sorted(cascades.cascades))})"
        )
    spec = cascades.cascades[name]
    for role, model in (("light", spec.light), ("heavy", spec.heavy)):
        if model not in profile.models:
            raise InputError(
                f"{profile_path}: models: no latency for {model!r}, the {role} model of cascade {name!r}"
            )
    conf = None
    if spec.confidences:
        conf = Path(cascades_path).parent / spec.confidences
    return Cascade(
        name=name,
        slo_s=spec.slo_s,
        light_model=spec.light,
        heavy_model=spec.heavy,
        light=profile.models[spec.light],
        heavy=profile.models[spec.heavy],
        discriminator=profile.discriminator,
        deferral=spec.deferral_curve,
        fid=spec.fid,
        fid_random=spec.fid_random_mix,
        gpu=profile.gpu,
        confidences_path=conf,
        overheads=profile.overheads,
        batch_time_correlation=profile.batch_time_correlation,
        batch_time_contention=profile.batch_time_contention,
    )
