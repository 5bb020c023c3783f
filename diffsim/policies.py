"""Serving policies: given the demand estimate and queueing delays, which plan to run.

All policies are pure (no clock, no I/O) and go through the one allocator:

* ``diffserve``       — the MILP with the quality objective (minimise the expected FID of the mix);
* ``diffserve-maxt``  — the MILP with the DiffServe paper's objective (maximise the threshold);
* ``static``          — a fixed cascade plan (the paper's static plans, scaled to the GPU count);
* ``clipper-light``   — every GPU on the light model, batch 1, nothing deferred;
* ``clipper-heavy``   — every GPU on the heavy model, batch 1;
* ``proteus``         — query-agnostic: the MILP splits GPUs between the two models and queries are split
  in proportion to capacity, no discriminator.

The allocator returns the fewest GPUs that meet the constraints. A serving system should not leave the
rest idle, so the MILP policies hand spare GPUs out afterwards (:func:`spread_spare_gpus`): each goes to
the stage whose predicted utilisation is highest, which lowers queueing without changing the batch
sizes, the threshold or any constraint the plan was chosen under.

The MILP policies plan with a queueing delay per stage (``queue_model``): ``little``, the delay measured
under the plan in force (the DiffServe artifact's, every policy's default), or one computed per candidate
plan from the queues it inherits (``mean``, or ``tail``: a quantile of latency meets the SLO; see
:mod:`diffsim.runtime.queueing`). With the latter, spare GPUs first stay on the stage they serve in the
plan in force, so that plans following the queues do not turn into role switches, and the threshold
grid is refined so that the deferred fraction moves in steps of about :data:`DEFERRAL_STEP`
(:func:`deferral_grid`): the allocator's grid of thresholds every 0.005 defers 0% or 14.3% of
sdturbo-sdv15's queries and nothing between (its deferral curve is steep near 0), and a plan-dependent
delay sizes the heavy stage closely enough that at peak load 14.3% does not fit where 5% would: the
plans fell back to deferring nothing (every image light) for whole peaks. They also re-plan with
hysteresis (:meth:`MilpPolicy._keep_split`): a new plan that moves GPUs between the stages is taken
only when the best plan on the worker split in force is infeasible, or more than
:data:`SWITCH_MARGIN` (0.5%) worse in expected FID while the new split also carries the highest demand
of the controller's stabilisation window (``controller.stabilization_s``, 60 s); otherwise that plan is
(new threshold and batch sizes, no role switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

from .allocator import DEFAULT_BATCH_SIZES, DEFAULT_THRESHOLDS, allocate
from .runtime.queueing import DEFAULT_TAIL_QUANTILE
from . import limits
from .errors import DiffsimError
from .plan import Plan, StagePlan
from .profiles import Cascade

POLICY_NAMES = ("diffserve", "diffserve-maxt", "static", "clipper-light", "clipper-heavy", "proteus")

# The DiffServe paper's static plans for 16 A100 GPUs (shared/reference/diffserve_artifact.yaml, baselines).
PAPER_STATIC_PLANS = {
    "sdturbo-sdv15": {"threshold": 0.02, "light_workers": 4, "heavy_workers": 12, "light_batch": 16, "heavy_batch": 4},
    "sdxs-sdv15": {"threshold": 0.12, "light_workers": 2, "heavy_workers": 14, "light_batch": 32, "heavy_batch": 4},
    "sdxlltn-sdxl": {"threshold": 0.02, "light_workers": 9, "heavy_workers": 7, "light_batch": 4, "heavy_batch": 2},
}
PAPER_STATIC_GPUS = 16

# Plan each stage to at most this fraction of its capacity. With capacity merely >= demand (1.0, the
# paper's constraint) a stage runs at ~95% utilisation under the EWMA x 1.05 estimate, and every Poisson
# burst turns into queueing delay; 0.8 keeps queues short at a small cost in quality (see README).
DEFAULT_MAX_UTILIZATION = 0.8

# The queueing delay each MILP policy plans with when the run does not say (``queue_model``, see
# :func:`diffsim.allocator.allocate`): ``little``, one delay per stage measured under the plan in force
# (the DiffServe artifact's), for every policy.
DEFAULT_QUEUE_MODEL = {"diffserve": "little", "diffserve-maxt": "little", "proteus": "little"}

# With a plan-dependent delay (queue_model mean or tail) the cascade policies choose among thresholds at
# which the deferred fraction moves by about this much (up to rounding) (see the module docstring).
DEFERRAL_STEP = 0.01

# With a plan-dependent delay, a re-plan keeps the worker split in force when the best plan on it is
# feasible and its expected FID is within this fraction of the new plan's (MilpPolicy._keep_split).
SWITCH_MARGIN = 0.005


@dataclass(frozen=True)
class PolicyInput:
    demand_qps: float  # estimated demand (EWMA x head-room)
    queue_delay_s: tuple[float, float]  # (light, heavy) Little's-law estimates
    gpus: int
    queue_lengths: tuple[int, int] = (0, 0)  # (light, heavy) queued now: the backlog a new plan inherits
    current: Optional[Plan] = None  # the plan in force (None at the start)
    # the highest demand planned for over the controller's stabilisation window, this one's included
    # (None: no window): a role switch must carry it too (MilpPolicy._keep_split)
    peak_demand_qps: Optional[float] = None


class Policy(Protocol):
    name: str
    # whether plan() reads PolicyInput.peak_demand_qps: the controller remembers past demands only for a
    # policy that does (and its idle re-plans then wait for them to leave the window; see the controller)
    reads_peak_demand: bool

    def plan(self, inp: PolicyInput) -> Plan: ...


@dataclass(frozen=True)
class StaticPlanSpec:
    threshold: float
    light_workers: int
    heavy_workers: int
    light_batch: int
    heavy_batch: int
    gpus: int = PAPER_STATIC_GPUS  # the GPU count the plan was written for; scaled to the actual count

    @classmethod
    def from_dict(cls, d: dict, error: type[Exception] = DiffsimError) -> "StaticPlanSpec":
        """A checked plan; a problem raises ``error`` (DiffsimError, or ValueError for a config file's
        validator) with one line naming the field."""
        if not isinstance(d, dict):
            raise error(f"static plan: expected a mapping of fields, got {type(d).__name__}")
        known = {"threshold", "light_workers", "heavy_workers", "light_batch", "heavy_batch", "gpus"}
        unknown = set(d) - known
        if unknown:
            raise error(f"static plan: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = known - {"gpus"} - set(d)
        if missing:
            raise error(f"static plan: missing field(s) {', '.join(sorted(missing))}")
        bounds = {"threshold": limits.FRACTION, "light_workers": limits.WORKERS, "heavy_workers": limits.WORKERS, "light_batch": limits.BATCH_SIZE,
                  "heavy_batch": limits.BATCH_SIZE, "gpus": limits.GPUS}
        for name, value in d.items():
            if not bounds[name].contains(value):
                raise error(f"static plan: {name} must be {bounds[name].describe()}, got {value!r}")
        spec = cls(**d)
        workers = spec.light_workers + spec.heavy_workers
        if workers < 1:
            raise error("static plan: worker counts must be >= 0 and not both 0")
        if workers > spec.gpus:
            raise error(f"static plan: {spec.light_workers} light + {spec.heavy_workers} heavy workers need {workers} "
                        f"GPUs but the plan is written for {spec.gpus} (give gpus: {workers}; it is then scaled "
                        "to the run's GPU count)")
        return spec


def _stage(cascade: Cascade, role: str, workers: int, batch: int, with_disc: bool) -> StagePlan:
    table = cascade.light if role == "light" else cascade.heavy
    model = cascade.light_model if role == "light" else cascade.heavy_model
    if workers == 0:
        return StagePlan(role, model, 0, batch, 0.0, 0.0)
    ms = table.latency_ms(batch)
    if ms is None:
        raise DiffsimError(f"no latency for {model} at batch size {batch} in the {cascade.gpu} profile")
    if with_disc:
        d = cascade.discriminator.latency_ms(batch)
        if d is None:
            raise DiffsimError(f"no discriminator latency at batch size {batch} in the {cascade.gpu} profile")
        ms += d
    lat = ms / 1e3
    return StagePlan(role, model, workers, batch, lat, workers * batch / lat)


def spread_spare_gpus(plan: Plan, current: Optional[Plan] = None) -> Plan:
    """Give GPUs the allocator left unused to the stage with the highest predicted utilisation.

    With ``current`` (the plan in force, same routing mode), spare GPUs first go back to the stage they
    serve now: each stage gets up to as many workers as it has in ``current``, even a stage the new plan
    gives no load (it keeps its batch size from ``current``), and only the rest are spread by utilisation.
    Spare GPUs cost nothing where they are, and moving one is a role switch: without this, a plan that
    briefly stops deferring sends every spare heavy worker to the light stage, and the next plan sends
    them back.
    """
    spare = plan.gpus - plan.gpus_used
    if spare <= 0:
        return plan
    stages = {s.role: s for s in plan.stages}
    if current is not None and current.mode == plan.mode:
        for role in ("light", "heavy"):
            now = current.stage(role)
            add = min(spare, max(0, now.workers - stages[role].workers))
            if add == 0:
                continue
            base = stages[role] if stages[role].workers else now  # an unused stage keeps its batch size
            per_worker = base.capacity_qps / base.workers
            workers = stages[role].workers + add
            stages[role] = replace(base, workers=workers, capacity_qps=workers * per_worker)
            spare -= add
    load = {
        "light": plan.demand_qps * (1.0 if plan.mode == "cascade" else plan.light_share),
        "heavy": plan.demand_qps * plan.deferral_fraction,
    }
    used = [r for r in ("light", "heavy") if stages[r].workers > 0]
    if used and spare > 0:
        workers = {r: stages[r].workers for r in used}
        per_worker = {r: stages[r].capacity_qps / stages[r].workers for r in used}
        for _ in range(spare):
            # highest utilisation first; ties to the light stage (it sees every query in cascade mode)
            role = max(used, key=lambda r: (load[r] / (workers[r] * per_worker[r]), r == "light"))
            workers[role] += 1
        for r in used:
            stages[r] = replace(stages[r], workers=workers[r], capacity_qps=workers[r] * per_worker[r])
    new = (stages["light"], stages["heavy"])
    if new == plan.stages:
        return plan
    return replace(plan, stages=new, extra={**plan.extra, "spare_gpus_assigned": plan.gpus - plan.gpus_used})


def deferral_grid(cascade: Cascade, step: float = DEFERRAL_STEP) -> tuple[float, ...]:
    """The allocator's thresholds (every 0.005) and, between them, the thresholds at which the cascade's
    deferral curve reaches each multiple of ``step`` (its inverse: the simulator draws confidences by the
    same inverse, so the deferred fraction at each is the curve's), sorted; rounded to 6 decimals."""
    if not 0 < step < 1:
        raise DiffsimError(f"deferral step must lie in (0, 1), got {step!r}")
    k = math.ceil(1 / step - 1e-9)
    points = {round(cascade.deferral.inverse(min(1.0, i * step)), 6) for i in range(1, k)}
    return tuple(sorted(set(DEFAULT_THRESHOLDS) | points))


@dataclass
class MilpPolicy:
    """diffserve / diffserve-maxt / proteus: the allocator, then spare GPUs spread."""

    name: str
    cascade: Cascade
    objective: str
    mode: str
    batch_sizes: tuple[int, ...]
    thresholds: Optional[tuple[float, ...]] = None
    batch_wait: float = 0.0
    max_utilization: float = DEFAULT_MAX_UTILIZATION
    queue_model: str = "little"  # little: the measured delay; mean / tail: per plan, from the backlog
    routing: str = "least-loaded"  # the routing the plan-dependent delay models
    tail_quantile: float = DEFAULT_TAIL_QUANTILE
    switch_margin: float = SWITCH_MARGIN  # hysteresis with a plan-dependent delay; 0: none
    fallback: str = "none"  # "light": late deferred queries get their light image; heavy planned to its capacity

    def __post_init__(self) -> None:
        # The threshold grid the allocator chooses from: pinned (a sweep), the allocator's own, or with a
        # plan-dependent delay in cascade mode one with deferral steps of at most DEFERRAL_STEP.
        self.grid = self.thresholds
        if self.grid is None and self.mode == "cascade" and self.queue_model != "little":
            self.grid = deferral_grid(self.cascade)

    @property
    def reads_peak_demand(self) -> bool:
        """The hysteresis (and with it the stabilisation window) applies with a plan-dependent delay."""
        return self.queue_model != "little"

    def plan(self, inp: PolicyInput) -> Plan:
        plan = self._allocate(inp)
        if self.queue_model == "little":
            # The little model keeps its original spreading and no hysteresis (the artifact's; diffsim's
            # outputs unchanged).
            return spread_spare_gpus(plan)
        # With a delay model that reads the backlog, plans follow the queues more closely; keeping spare
        # GPUs where they are keeps that from turning into role switches.
        plan = spread_spare_gpus(plan, inp.current)
        return self._keep_split(plan, inp)

    def _allocate(self, inp: PolicyInput, workers: Optional[tuple[int, int]] = None) -> Plan:
        return allocate(
            self.cascade,
            inp.gpus,
            inp.demand_qps,
            queue_delay_s=inp.queue_delay_s,
            batch_sizes=self.batch_sizes,
            thresholds=self.grid,
            objective=self.objective,
            mode=self.mode,
            batch_wait=self.batch_wait,
            max_utilization=self.max_utilization,
            queue_model=self.queue_model,
            backlog=inp.queue_lengths,
            routing=self.routing,
            tail_quantile=self.tail_quantile,
            workers=workers,
            fallback=self.fallback,
        )

    def _keep_split(self, plan: Plan, inp: PolicyInput) -> Plan:
        """Hysteresis: ``plan``, or the best plan on the plan in force's worker split when that one is
        feasible for this demand and backlog and its expected FID is within ``switch_margin`` (a fraction)
        of ``plan``'s.

        Why: with the DiffServe artifact's estimator (queries in the system, about arrival rate x time in
        the system) the demand a plan is made for depends on the plan before it: a plan that defers more
        keeps more queries in the slow heavy stage, so the next estimate is higher, the next plan defers
        less, and so on. The light stage's worker count then flips between n and n + 1 at alternate re-plans
        (11-13 role switches in a minute), with the light queue building while it has too few. A split
        that still carries the demand within the SLO costs at most the margin in quality, and keeping it
        switches no role. The margin is relative, so it means the same for cascades with other FID scales:
        0.5% is about 0.1 FID on sdturbo-sdv15, about the FID of one DEFERRAL_STEP of deferral there.
        ``diffserve-maxt`` compares expected FIDs too (a threshold has no scale of its own; the quality is
        what a lower one costs), and ``proteus`` its random-mix FID.

        The stabilisation window (``inp.peak_demand_qps``, the highest demand the controller planned for
        over ``controller.stabilization_s``): while the split in force carries the present demand, a split
        that costs more than the margin is still kept unless the new split carries that peak too. Why: the
        margin cannot hold back a switch the estimate itself undoes. With the artifact's estimator a plan
        that serves queries fast (Proteus: nothing deferred, 0.35 s in the system) lowers the estimate to
        under half the arrival rate; the next plan gives the light stage one worker, its queue builds, the
        estimate jumps threefold and the plan after moves the GPUs back (13-20 role switches a minute on a
        step trace). A split that could not have carried the last minute's demand waits until it could. The
        split in force need not carry that peak itself: the window only holds back moves away from it.
        """
        cur = inp.current
        if (cur is None or cur.mode != plan.mode or not plan.feasible
                or cur.gpus_used == 0 or cur.gpus_used > inp.gpus
                or (plan.light.workers, plan.heavy.workers) == (cur.light.workers, cur.heavy.workers)):
            return plan
        peak = inp.peak_demand_qps
        held_back = peak is not None and peak > inp.demand_qps
        if self.switch_margin <= 0 and not held_back:
            return plan
        kept = self._allocate(inp, workers=(cur.light.workers, cur.heavy.workers))
        if not kept.feasible:  # the split in force cannot carry the present demand: switch
            return plan
        within_margin = kept.expected_fid <= plan.expected_fid * (1.0 + self.switch_margin)
        if not within_margin and (not held_back or self._carries(plan, replace(inp, demand_qps=peak))):
            return plan
        # A stage the kept plan leaves without load gets its workers back here (no switch either).
        kept = spread_spare_gpus(kept, cur)
        return replace(kept, extra={**kept.extra, "kept_split_over": (plan.light.workers, plan.heavy.workers,
                                                                       plan.expected_fid)})

    def _carries(self, plan: Plan, inp: PolicyInput) -> bool:
        """Whether some plan on ``plan``'s worker split is feasible for ``inp`` (its demand and backlog)."""
        return self._allocate(inp, workers=(plan.light.workers, plan.heavy.workers)).feasible


@dataclass
class FixedPolicy:
    """static / clipper-light / clipper-heavy: the same plan at any demand (its feasibility is reported)."""

    name: str
    cascade: Cascade
    mode: str  # "cascade" or "split"
    threshold: float
    light_share: float
    light_fraction_of_gpus: Optional[float]  # None: use explicit worker counts
    light_workers: int = 0
    heavy_workers: int = 0
    light_batch: int = 1
    heavy_batch: int = 1
    spec_gpus: int = PAPER_STATIC_GPUS
    reads_peak_demand = False  # not a field: the same plan at any demand, no window read

    def _workers(self, gpus: int) -> tuple[int, int]:
        if self.light_fraction_of_gpus is not None:
            light = round(gpus * self.light_fraction_of_gpus)
            return light, gpus - light
        if gpus == self.spec_gpus:
            return self.light_workers, self.heavy_workers
        # Scale the plan to the actual GPU count, keeping its light:heavy ratio (at least one worker each).
        total = self.light_workers + self.heavy_workers
        light = round(gpus * self.light_workers / total)
        if self.light_workers and gpus >= 1:
            light = max(light, 1)
        if self.heavy_workers and gpus >= 2:
            light = min(light, gpus - 1)
        return light, gpus - light

    def plan(self, inp: PolicyInput) -> Plan:
        c = self.cascade
        nl, nh = self._workers(inp.gpus)
        cascade_mode = self.mode == "cascade"
        light = _stage(c, "light", nl, self.light_batch, cascade_mode)
        heavy = _stage(c, "heavy", nh, self.heavy_batch, False)
        if cascade_mode:
            deferral = c.deferral(self.threshold)
            fid = c.fid(1.0 - deferral)
            light_load, heavy_load = inp.demand_qps, inp.demand_qps * deferral
            latency = light.latency_s + inp.queue_delay_s[0] + (
                heavy.latency_s + inp.queue_delay_s[1] if deferral > 0 else 0.0)
        else:
            deferral = 1.0 - self.light_share
            fid = c.random_mix_fid(self.light_share)
            light_load, heavy_load = inp.demand_qps * self.light_share, inp.demand_qps * deferral
            latency = max(light.latency_s + inp.queue_delay_s[0] if nl else 0.0,
                          heavy.latency_s + inp.queue_delay_s[1] if nh else 0.0)
        problems = []
        if light_load > light.capacity_qps + 1e-9:
            problems.append(f"light capacity {light.capacity_qps:.2f} qps < load {light_load:.2f} qps")
        if heavy_load > heavy.capacity_qps + 1e-9:
            problems.append(f"heavy capacity {heavy.capacity_qps:.2f} qps < load {heavy_load:.2f} qps")
        if latency > c.slo_s:
            problems.append(f"predicted latency {latency:.2f} s > SLO {c.slo_s:g} s")
        return Plan(
            cascade=c.name,
            mode="cascade" if cascade_mode else "split",
            stages=(light, heavy),
            threshold=self.threshold if cascade_mode else 0.0,
            light_share=1.0 if cascade_mode else self.light_share,
            deferral_fraction=deferral,
            expected_fid=fid,
            predicted_latency_s=latency,
            demand_qps=inp.demand_qps,
            gpus=inp.gpus,
            feasible=not problems,
            reason="; ".join(problems),
            objective="fixed",
        )


def make_policy(
    name: str,
    cascade: Cascade,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    static_plan: Optional[dict] = None,
    thresholds: Optional[Sequence[float]] = None,
    max_utilization: float = DEFAULT_MAX_UTILIZATION,
    batch_wait: float = 0.0,
    queue_model: Optional[str] = None,
    routing: str = "least-loaded",
    tail_quantile: float = DEFAULT_TAIL_QUANTILE,
    switch_margin: float = SWITCH_MARGIN,
    fallback: str = "none",
) -> Policy:
    """Build a policy by name.

    ``thresholds`` pins the MILP's threshold grid (for threshold sweeps); ``max_utilization``,
    ``batch_wait``, ``queue_model`` (None: the policy's default, :data:`DEFAULT_QUEUE_MODEL`), ``routing``
    and ``tail_quantile`` are passed to the allocator (see :func:`diffsim.allocator.allocate`);
    ``switch_margin`` is the MILP policies' hysteresis with a plan-dependent delay
    (:meth:`MilpPolicy._keep_split`; 0 turns it off). ``fallback`` is the run's (``light``: the MILP
    policies plan the heavy stage as :func:`diffsim.allocator.allocate` says).
    """
    if not 0 <= switch_margin < 1:
        raise DiffsimError(f"switch margin must lie in [0, 1), got {switch_margin!r}")
    bs = tuple(int(b) for b in batch_sizes)
    th = None if thresholds is None else tuple(float(t) for t in thresholds)
    milp = {"diffserve": ("quality", "cascade"), "diffserve-maxt": ("max-threshold", "cascade"),
            "proteus": ("quality", "split")}
    if name in milp:
        objective, mode = milp[name]
        model = DEFAULT_QUEUE_MODEL[name] if queue_model is None else queue_model
        return MilpPolicy(name, cascade, objective, mode, bs, th, batch_wait, max_utilization, model, routing,
                          tail_quantile, switch_margin, fallback)
    if name == "clipper-light":
        return FixedPolicy(name, cascade, "split", 0.0, 1.0, 1.0)
    if name == "clipper-heavy":
        return FixedPolicy(name, cascade, "split", 0.0, 0.0, 0.0)
    if name == "static":
        if static_plan is None:
            if cascade.name not in PAPER_STATIC_PLANS:
                raise DiffsimError(
                    f"no static plan for cascade {cascade.name!r}: give one (threshold, light_workers, "
                    "heavy_workers, light_batch, heavy_batch)")
            static_plan = PAPER_STATIC_PLANS[cascade.name]
        spec = StaticPlanSpec.from_dict(dict(static_plan))
        threshold = spec.threshold if th is None else th[0]
        return FixedPolicy(name, cascade, "cascade", threshold, 1.0, None, spec.light_workers,
                           spec.heavy_workers, spec.light_batch, spec.heavy_batch, spec.gpus)
    raise DiffsimError(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})")


def policy_for(config, *, thresholds: Optional[Sequence[float]] = None,
               switch_margin: float = SWITCH_MARGIN) -> Policy:
    """The policy a run config names (a :class:`~diffsim.config.RunConfig`: the simulator's or the server's);
    ``thresholds`` and ``switch_margin`` as :func:`make_policy` takes them."""
    return make_policy(
        config.policy,
        config.cascade,
        batch_sizes=config.batch_sizes,
        static_plan=config.static_plan,
        thresholds=thresholds,
        max_utilization=config.max_utilization,
        batch_wait=config.batch_wait,
        queue_model=config.queue_model,
        routing=config.routing,
        tail_quantile=config.tail_quantile,
        switch_margin=switch_margin,
        fallback=config.fallback,
    )
