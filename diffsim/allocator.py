"""The allocator: how many GPUs run each model, at which batch size, with which threshold.

The model is a MILP, the formulation of record, solved with ``scipy.optimize.milp`` (HiGHS) when
``solver="milp"``; ``solver="exact"`` (the default) returns the same plan from a structured enumeration,
some 15-70 times faster: about a tenth of a millisecond once the cascade's candidates are ranked, 0.1x
a trivial ``milp`` call, and a few tenths with the ranking (the first solve for a cascade), 0.25x (see
*The exact solver* below, and ``benchmarks/bench_allocator.py``).

The formulation, for the default ``cascade`` mode:

Variables
    ``y[s,b]``  binary, stage s (light/heavy) runs batch size b;
    ``x[s,b]``  integer workers of stage s at batch size b (0 unless ``y[s,b]``);
    ``z[k]``    binary, threshold candidate k is chosen.
Constraints
    one threshold:              sum_k z[k] = 1
    one batch size per stage:   sum_b y[L,b] = 1;  sum_b y[H,b] <= 1, and >= sum of z[k] whose f(t_k) > 0
    workers only where chosen:  y[s,b] <= x[s,b] <= M[s,b] * y[s,b]
    GPUs:                       sum x <= G
    light capacity:             sum_b cap[L,b] * x[L,b] >= D
    heavy capacity:             sum_b cap[H,b] * x[H,b] >= D * sum_k f(t_k) z[k]
    latency (SLO):              sum_b (lat[L,b] + qL) y[L,b] + sum_b (lat[H,b] + qH) y[H,b] <= SLO
where ``cap[s,b] = b / lat[s,b]`` is one worker's throughput at batch b. Because each (stage, batch) pair
has its own integer worker count, total capacity ``sum cap * x`` is linear and exact: there is no
product of two variables and nothing is approximated. Light latency includes the discriminator.

The objective is lexicographic — primary objective, then fewer GPUs, then lower latency — encoded exactly
as ``rank[k] * (G + 2) + sum x + latency / L``: candidates are replaced by the integer rank of their
primary value (``quality``: expected FID of the mix, ``FID(1 - f(t))``; ``max-threshold``: -t), GPUs are
integers below ``G + 2`` and the normalised latency lies in [0, 1). Thresholds with equal f(t) are
merged first (the lowest t for ``quality``, the highest for ``max-threshold``) so every rank is unique
and the answer is fully determined.

``split`` mode (Proteus, query-agnostic) uses the same model with a heavy *share* p instead of f(t):
light capacity >= D (1 - p), heavy capacity >= D p, no discriminator, and each path alone must meet the
SLO. ``light-only`` and ``heavy-only`` are split mode with p fixed at 0 or 1 (the Clipper baselines).

Two generalisations, off by default (the paper's model): ``max_utilization`` U plans each stage to at most U
of its capacity (``U * capacity >= load``; the serving policies use 0.8, see :mod:`diffsim.policies`), and
``batch_wait`` W counts W of a batch time per stage as waiting for the batch in flight, so a stage's latency
term is ``(1 + W) * lat + q``.

Plan-dependent queueing delay (``queue_model`` ``mean`` or ``tail``; the default ``little`` is the model
above, the DiffServe artifact's). A delay measured under the plan in force and taken off the SLO for every
candidate makes every plan that uses a congested stage look infeasible, however many workers it gives
that stage; the allocator then drops the stage and its queue strands. Here the delay of stage s under a
candidate is computed from the candidate itself (:mod:`diffsim.runtime.queueing`): the drain of the stage's
backlog at that plan's capacity plus the steady-state wait at that plan's utilisation (its mean, or in
``tail`` mode a quantile), for the routing in use. It is a constant per (candidate, stage, batch size,
workers), precomputed into one path table ``path[s][k, b, n]`` (batch time x (1 + W) + delay, capped above
the SLO where the plan cannot be) that both solvers read, so the model stays linear and exact:

    latency (SLO):  path[L][k, bL, nL] + path[H][k, bH, nH] <= SLO   for the chosen k, batch sizes, workers

The MILP encodes it with a binary per (stage, batch size, worker count) and big-M rows per candidate
(:func:`_solve_queued_milp`); the exact solver walks the candidates in rank order and, per batch pair,
finds the fewest GPUs by a search over the light worker count (the path never rises with workers), then
the least summed path (:func:`_solve_queued_exact`). The objective's third term is the summed path
(batch time and delay) instead of the batch time alone. A stage that holds queued work always runs: no
plan, the best-effort one included, leaves queued work without a worker. In ``tail`` mode the quantile is
that of all queries' latency (:meth:`_Queueing.path_rules`). Dominated batch sizes are not pruned in
this mode (a slower batch size with less capacity can still wait less: its queue has more slots).

The exact solver here costs what the delay model costs: one ``stage_delay`` entry per (candidate, batch
size, worker count) it looks at. So it looks at few: candidates that could not fit even with no delay are
skipped; the others are taken a group at a time (1, 4, 16, ... in rank order, one ``stage_delay`` call per
stage for the group) over a window of worker counts from the fewest the group needs, widened only for
candidates whose plan may lie beyond it (:data:`_WINDOW`, :func:`_first_answer`). About 1 ms of CPU a
solve at the median from 16 to 1024 GPUs with least-loaded routing, 1.5-3 ms with random routing at 16-64
GPUs; with random routing at 256-1024 GPUs plans use most of the GPUs (each worker's own queue needs a
low utilisation for its tail) and every candidate ranked above the answer has to be ruled out at all
worker counts: 2.5-15 ms there (``benchmarks/bench_allocator.py``, CPU time on a loaded 2-core machine).

Before the solve, candidates are pruned by two exact bounds: one that needs more GPUs than any batch
size allows cannot be feasible, and one ranked below an incumbent (a candidate that each stage's
highest-throughput batch size already serves) cannot be optimal. Batch sizes that another one dominates
(no faster, no more capacity) are dropped too: no optimum needs them, and it settles the one kind of tie
the objective cannot see (equal latency at two batch sizes: the larger is kept). This keeps the MILP
small; it still chooses every batch size, worker count and the threshold among the rest.

The exact solver
    Fix a candidate (so each stage's load) and a batch size per stage: the only decisions left are the
    worker counts, and the objective wants each stage at its fewest workers that carry its load,
    ``max(1, ceil(load / (U * cap)))`` for a stage that gets traffic, none for one that does not. So a
    (candidate, light batch, heavy batch) triple is feasible iff those counts fit in G GPUs and the pair
    meets the SLO (in cascade mode, both paths together); nothing else in the MILP constrains it. The
    objective's first term is the candidate's rank, so the optimum belongs to the best-ranked candidate
    with any feasible pair, and among that candidate's pairs it has the fewest GPUs, then the least summed
    batch time: exactly ``rank * (G + 2) + sum x + latency / L`` minimised. The solver works on the same
    pruned candidates and batch sizes as the MILP, with the same worker rounding. It finds the feasible
    candidates all at once with numpy, over (candidate, heavy option) with the heavy stage "off" as one
    more option: for a heavy option, the light batch size of most capacity among those that meet the SLO
    with it needs the fewest light workers for every candidate (a worker count never rises with
    capacity), so it alone decides whether any pair with that heavy option fits. It takes the first
    feasible candidate (no monotonicity of feasibility along the ranking is assumed), then scans that
    candidate's pairs for the fewest GPUs and least batch time. Where two batch pairs tie exactly on all
    three terms (possible only across the two stages, with equal sums of batch times), it takes the
    smallest light batch size, then heavy; HiGHS's pick there is arbitrary, as is its pick between plans
    whose objectives differ by less than its absolute gap (1e-6). The property test
    ``tests/test_allocator_exact.py`` checks that the two solvers return the same plan.

When nothing meets the constraints the allocator does not raise: it returns the best-effort plan (all
GPUs on the light model, threshold 0, the profiled batch size of most throughput, within the SLO or not)
with ``feasible=False`` and the reason; both solvers share it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal, Optional, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .errors import DiffsimError
from .plan import Plan, StagePlan
from .profiles import Cascade
from .runtime.batching import FALLBACKS
from .runtime.queueing import DEFAULT_TAIL_QUANTILE, QUEUE_MODELS, stage_delay

Objective = Literal["quality", "max-threshold"]
Mode = Literal["cascade", "split", "light-only", "heavy-only"]

OBJECTIVES = ("quality", "max-threshold")
MODES = ("cascade", "split", "light-only", "heavy-only")
Solver = Literal["exact", "milp"]
SOLVERS = ("exact", "milp")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
DEFAULT_THRESHOLDS = tuple(round(i * 0.005, 3) for i in range(201))


@dataclass(frozen=True)
class _Stage:
    """Feasible batch sizes of one stage with their latency (s, queueing delay included) and capacity."""

    batch_sizes: tuple[int, ...]
    latency_s: tuple[float, ...]  # batch time only
    path_s: tuple[float, ...]  # batch time + queueing delay
    capacity: tuple[float, ...]  # per worker, queries/s


@dataclass(frozen=True)
class _Candidate:
    key: float  # threshold t (cascade) or heavy share p (split)
    heavy_fraction: float  # fraction of demand that reaches the heavy stage
    light_fraction: float  # fraction of demand that reaches the light stage
    fid: float


def allocate(
    cascade: Cascade,
    gpus: int,
    demand_qps: float,
    *,
    queue_delay_s: tuple[float, float] = (0.0, 0.0),
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    thresholds: Optional[Sequence[float]] = None,
    objective: Objective = "quality",
    mode: Mode = "cascade",
    batch_wait: float = 0.0,
    max_utilization: float = 1.0,
    solver: Solver = "exact",
    queue_model: str = "little",
    backlog: tuple[float, float] = (0.0, 0.0),
    routing: str = "least-loaded",
    tail_quantile: float = DEFAULT_TAIL_QUANTILE,
    workers: Optional[tuple[int, int]] = None,
    fallback: str = "none",
) -> Plan:
    """Solve for the best plan; see the module docstring for the model.

    ``queue_model`` says where each stage's queueing delay comes from: ``little`` (default, the DiffServe
    artifact's) takes ``queue_delay_s``, one measured delay per stage for every candidate plan; ``mean`` and
    ``tail`` compute it per candidate from the plan itself (*Plan-dependent queueing delay* in the module
    docstring): ``backlog`` (queries queued per stage, light and heavy), ``routing`` and, for ``tail``, the
    ``tail_quantile`` of the wait; ``queue_delay_s`` is then not used.

    ``batch_wait`` counts, per stage, that fraction of one batch time as waiting for the batch in flight
    (eager batching: a query that arrives while its worker is busy waits for that batch first). 0 is the
    DiffServe paper's model (batch time + queueing delay); 1 is the worst case.

    ``solver`` picks how the model is solved: ``exact`` (the structured enumeration in
    :func:`_solve_exact`, about 0.1 ms) or ``milp`` (the formulation of record, HiGHS, milliseconds);
    both return the same plan, as ``tests/test_allocator_exact.py`` checks.

    ``workers`` (light, heavy), with ``mean`` or ``tail`` only: the best plan whose running stages have
    exactly these worker counts (:func:`_allocate_pinned`; a policy's hysteresis asks it for the split in
    force); infeasible when none meets the constraints with them.

    ``fallback`` ``light`` (cascade mode, ``mean`` or ``tail``): the run answers a deferred query whose
    heavy image would be late with its light image, so the heavy stage is planned to its capacity and the
    deferred path to its mean, the light stage alone to ``tail_quantile`` in ``tail`` mode
    (:meth:`_Queueing.path_rules`); ``none`` (default) plans both stages as the queue model says.
    """
    started = time.perf_counter()
    _check_inputs(gpus, demand_qps, queue_delay_s, batch_sizes, objective, mode)
    if solver not in SOLVERS:
        raise DiffsimError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    if not 0 < max_utilization <= 1:
        raise DiffsimError(f"max_utilization must lie in (0, 1], got {max_utilization!r}")
    if not 0 <= batch_wait <= 1:
        raise DiffsimError(f"batch_wait must lie in [0, 1], got {batch_wait!r}")
    grid = DEFAULT_THRESHOLDS if thresholds is None else tuple(thresholds)
    if thresholds is not None and (not grid or any(not 0 <= t <= 1 for t in grid)):
        raise DiffsimError("thresholds must be a non-empty list of values in [0, 1]")
    queueing = _queueing(queue_model, backlog, routing, tail_quantile, batch_wait, max_utilization, fallback)
    q_light, q_heavy = queue_delay_s if queueing is None else (0.0, 0.0)
    use_disc = mode == "cascade"
    light = _stage(cascade, "light", batch_sizes, q_light, use_disc, batch_wait, max_utilization)
    heavy = _stage(cascade, "heavy", batch_sizes, q_heavy, False, batch_wait, max_utilization)
    candidates = _candidates(cascade, grid, objective, mode)
    if workers is not None:
        if queueing is None:
            raise DiffsimError("pinned worker counts need a plan-dependent queue model (mean or tail)")
        if len(workers) != 2 or any(int(w) != w or w < 0 for w in workers):
            raise DiffsimError(f"workers must be two counts >= 0 (light, heavy), got {workers!r}")
        plan = _allocate_pinned(cascade, gpus, demand_qps, light, heavy, candidates, mode, objective, queueing,
                                (int(workers[0]), int(workers[1])))
        return _with_solve_ms(plan, (time.perf_counter() - started) * 1e3)
    if queueing is not None:
        plan = _allocate_queued(cascade, gpus, demand_qps, light, heavy, candidates, mode, objective, queueing, solver)
        return _with_solve_ms(plan, (time.perf_counter() - started) * 1e3)

    waits = (batch_wait, queue_delay_s)
    solve = _solve_exact if solver == "exact" else _solve_milp
    plan = solve(cascade, gpus, demand_qps, light, heavy, candidates, mode, objective, waits)
    if plan is None:
        plan = _best_effort(cascade, gpus, demand_qps, light, heavy, mode, objective, waits)
    elapsed = (time.perf_counter() - started) * 1e3
    return _with_solve_ms(plan, elapsed)


def _check_inputs(gpus, demand_qps, queue_delay_s, batch_sizes, objective, mode) -> None:
    if not isinstance(gpus, (int, np.integer)) or gpus < 0:
        raise DiffsimError(f"gpus must be a non-negative integer, got {gpus!r}")
    if not math.isfinite(demand_qps) or demand_qps < 0:
        raise DiffsimError(f"demand must be a finite number >= 0 queries/s, got {demand_qps!r}")
    if len(queue_delay_s) != 2 or any(not math.isfinite(q) or q < 0 for q in queue_delay_s):
        raise DiffsimError(f"queue delays must be two numbers >= 0 seconds (light, heavy), got {queue_delay_s!r}")
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise DiffsimError(f"batch sizes must be integers >= 1, got {list(batch_sizes)!r}")
    if objective not in OBJECTIVES:
        raise DiffsimError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    if mode not in MODES:
        raise DiffsimError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")


def _stage(cascade: Cascade, role: str, batch_sizes, queue_delay: float, with_discriminator: bool,
           batch_wait: float, max_utilization: float) -> _Stage:
    sizes, lats = _memoised(cascade, ("latency", role, tuple(batch_sizes), with_discriminator),
                            lambda: _batch_latencies(cascade, role, batch_sizes, with_discriminator))
    paths = tuple(lat * (1.0 + batch_wait) + queue_delay for lat in lats)
    caps = tuple(b / lat * max_utilization for b, lat in zip(sizes, lats))  # usable: planned load stays below
    return _Stage(sizes, lats, paths, caps)


def _batch_latencies(cascade: Cascade, role: str, batch_sizes, with_discriminator: bool):
    """The allowed batch sizes that have a latency in the profile, and that latency in seconds."""
    table = cascade.light if role == "light" else cascade.heavy
    sizes, lats = [], []
    for b in sorted(set(int(b) for b in batch_sizes)):
        ms = table.latency_ms(b)
        if ms is None:
            continue
        if with_discriminator:
            d = cascade.discriminator.latency_ms(b)
            if d is None:
                continue
            ms += d
        sizes.append(b)
        lats.append(ms / 1e3)
    return tuple(sizes), tuple(lats)


_MEMO: dict[tuple, tuple[Cascade, object]] = {}  # (id(cascade), *key) -> (cascade, value)


def _memoised(cascade: Cascade, key: tuple, compute):
    """``compute()`` once per cascade and key. What is memoised depends on the profile only (never on
    demand, GPUs or queueing), and a controller asks again every few seconds; the identity check keeps a
    new cascade that happens to get a freed one's ``id`` from reading its entries."""
    full = (id(cascade),) + key
    hit = _MEMO.get(full)
    if hit is not None and hit[0] is cascade:
        return hit[1]
    if len(_MEMO) > 256:
        _MEMO.clear()
    value = compute()
    _MEMO[full] = (cascade, value)
    return value


@dataclass(frozen=True)
class _Ranked:
    """The ranked candidates of one cascade as arrays, best first (what the solvers read), and each as a
    :class:`_Candidate` on demand (the exact solver needs one, the MILP all of them)."""

    keys: np.ndarray  # threshold t (cascade) or heavy share p (split) per candidate
    light: np.ndarray  # light_fraction per candidate
    heavy: np.ndarray  # heavy_fraction per candidate
    fids: np.ndarray
    light_off: np.ndarray  # light_fraction == 0: the light stage is not used
    heavy_off: np.ndarray
    light_off_cost: np.ndarray  # workers of the light stage's "off" option: 0 where it is off, else inf
    heavy_off_cost: np.ndarray

    def candidate(self, k: int) -> _Candidate:
        return _Candidate(float(self.keys[k]), float(self.heavy[k]), float(self.light[k]), float(self.fids[k]))

    @cached_property
    def cands(self) -> tuple[_Candidate, ...]:
        return tuple(map(_Candidate, self.keys.tolist(), self.heavy.tolist(), self.light.tolist(),
                         self.fids.tolist()))


def _candidates(cascade: Cascade, grid, objective: str, mode: str) -> _Ranked:
    """Threshold (or share) candidates, merged where indistinguishable, best first (memoised per cascade:
    they depend on neither demand nor GPUs)."""
    return _memoised(cascade, ("candidates", grid, objective, mode),
                     lambda: _rank_candidates(cascade, grid, objective, mode))


def _rank_candidates(cascade: Cascade, grid, objective: str, mode: str) -> _Ranked:
    """Every candidate's fractions and quality, merged, ranked and pruned to the frontier, all in numpy.

    Same arithmetic as reading the curves one threshold at a time (:func:`_interpolate` is
    ``Curve.__call__`` element for element, :func:`_round_like_python` is ``round``), so the same ranking
    as a Python loop, in a tenth of the time: this is most of a cold solve.
    """
    if mode == "cascade":
        keys = np.array(grid, dtype=float)
        heavy = _interpolate(cascade.deferral.curve, keys)
        light = np.ones_like(keys)
        fids = _interpolate(cascade.fid.curve, 1.0 - heavy)
    else:
        shares = {"split": grid, "light-only": (0.0,), "heavy-only": (1.0,)}[mode]
        keys = np.array(shares, dtype=float)
        heavy = keys
        light = 1.0 - keys
        if cascade.fid_random is not None:  # Cascade.random_mix_fid, element for element
            fids = _interpolate(cascade.fid_random.curve, light)
        else:
            fid0, fid1 = cascade.fid(0.0), cascade.fid(1.0)
            fids = fid0 + (fid1 - fid0) * light
    # Merge candidates with the same heavy fraction: they need the same resources and give the same quality.
    # In key order (stable: equal keys are equal candidates), quality keeps the first of each heavy fraction
    # (the lowest key), max-threshold the last (the highest).
    heavy = _round_like_python(heavy, 12)
    by_key = np.argsort(keys, kind="stable")
    if objective == "quality":
        _, first = np.unique(heavy[by_key], return_index=True)
        kept = by_key[first]
    else:
        _, last = np.unique(heavy[by_key][::-1], return_index=True)
        kept = by_key[len(by_key) - 1 - last]
    keys, heavy, light, fids = keys[kept], heavy[kept], light[kept], fids[kept]
    if objective == "quality":  # by FID, then heavy fraction, then key (unique after the merge)
        order = np.lexsort((keys, heavy, _round_like_python(fids, 9)))
    else:
        order = np.argsort(-keys, kind="stable")
    keys, heavy, light, fids = keys[order], heavy[order], light[order], fids[order]
    # A candidate ranked below another that sends no more traffic to either stage can never be chosen:
    # whenever it is feasible, the better-ranked one is too. Keep only the frontier (exact, not a heuristic).
    front = _frontier(heavy, light)
    keys, heavy, light, fids = keys[front], heavy[front], light[front], fids[front]
    light_off, heavy_off = light == 0, heavy == 0
    return _Ranked(keys, light, heavy, fids, light_off, heavy_off,
                   np.where(light_off, 0.0, np.inf), np.where(heavy_off, 0.0, np.inf))


def _interpolate(curve, xs: np.ndarray) -> np.ndarray:
    """``curve(x)`` for every x at once: ``Curve.__call__``'s clamping and arithmetic, element for element
    (``np.interp`` computes a slope first and can differ in the last bit)."""
    x = np.array(curve.x, dtype=float)
    y = np.array(curve.y, dtype=float)
    i = np.minimum(np.maximum(np.searchsorted(x, xs, side="right"), 1), len(x) - 1)
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # in entries the clamps below replace
        inner = y0 + (y1 - y0) * (xs - x0) / (x1 - x0)
    return np.where(xs <= x[0], y[0], np.where(xs >= x[-1], y[-1], inner))


_POWERS_OF_TEN = {9: 1e9, 12: 1e12}  # exact in binary


def _round_like_python(values: np.ndarray, digits: int) -> np.ndarray:
    """``round(v, digits)`` for every v, bit for bit, without a Python call per value (which costs ~1 us).

    Python rounds the exact binary value half-to-even and returns the double nearest that decimal;
    ``rint(v * 10**d) / 10**d`` does the same except where ``v * 10**d``, itself rounded, lands on the
    other side of a half than the exact product: only within its rounding error of a half. Those few
    values (and any too large for the integer to be exact) go through ``round`` itself.
    """
    scale = _POWERS_OF_TEN[digits]
    with np.errstate(over="ignore", invalid="ignore"):  # inf and huge values go through round below
        scaled = values * scale
        out = np.rint(scaled) / scale  # an exact integer over an exact power of ten: the nearest double
        size = np.abs(scaled)
        unsure = ~(size < 2.0 ** 50) | (np.abs(scaled - np.floor(scaled) - 0.5) <= size * 2.0 ** -50)
    if unsure.any():
        out[unsure] = [round(v, digits) for v in values[unsure].tolist()]
    return out


def _frontier(heavy: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Mask of the candidates (in rank order) that no better-ranked one dominates: none before it sends no
    more traffic to both stages. (Dominated by a dominated one means dominated by one kept, so comparing
    with every earlier candidate is the same as comparing with the kept ones.)"""
    n = len(heavy)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    if (light == light[0]).all():  # cascade mode: only the heavy fraction differs
        keep[1:] = heavy[1:] < np.minimum.accumulate(heavy)[:-1]
        return keep
    rank = np.arange(n)
    for start in range(1, n, 512):  # blocks of rows bound the memory at large grids
        rows = slice(start, min(n, start + 512))
        dominated = (heavy[None, :] <= heavy[rows, None]) & (light[None, :] <= light[rows, None])
        keep[rows] = ~(dominated & (rank[None, :] < rank[rows, None])).any(axis=1)
    return keep


def _batch_options(light: _Stage, heavy: _Stage, coupled: bool, slo: float) -> tuple[list[int], list[int]]:
    """Indices of the batch sizes of each stage that can meet the SLO at all (in cascade mode a heavy batch
    must also fit after the fastest light one, since a deferred query pays both), less dominated ones."""
    light_ok = _undominated(light, [i for i, p in enumerate(light.path_s) if p <= slo])
    if coupled:
        min_light = min((light.path_s[i] for i in light_ok), default=math.inf)
        heavy_ok = [i for i, p in enumerate(heavy.path_s) if p + min_light <= slo]
    else:
        heavy_ok = [i for i, p in enumerate(heavy.path_s) if p <= slo]
    return light_ok, _undominated(heavy, heavy_ok)


def _undominated(stage: _Stage, ok: list[int]) -> list[int]:
    """Drop a batch size when another is no slower and carries no less, and is better in one of the two.

    Exact: swapping it for the other never needs more workers and never adds latency, so no optimum needs
    it. It also settles ties the objective cannot see: two batch sizes with the same latency (a flat stretch
    of a profile) cost the same GPUs and time, and the larger one, with more capacity, is kept; left to
    HiGHS, the pick between them would be arbitrary.
    """
    lat, cap = stage.latency_s, stage.capacity
    # Fastest first (at equal latency the larger capacity first): a batch size is undominated iff it
    # carries strictly more than every one before it. (Equal latency and capacity would be one batch size.)
    keep, most = [], -math.inf
    for i in sorted(ok, key=lambda i: (lat[i], -cap[i])):
        if cap[i] > most:
            keep.append(i)
            most = cap[i]
    return sorted(keep)


def _servable(ranked: _Ranked, demand, gpus, light, heavy, light_ok, heavy_ok) -> np.ndarray:
    """Mask of the candidates whose load on each stage some batch size could carry on all the GPUs.

    Both solvers drop the others up front, with the same arithmetic, so they decide among the same set.
    """
    eps = 1e-9
    max_light_cap = max((light.capacity[i] for i in light_ok), default=0.0) * gpus
    max_heavy_cap = max((heavy.capacity[i] for i in heavy_ok), default=0.0) * gpus
    ok = (demand * ranked.light <= max_light_cap + eps) & (demand * ranked.heavy <= max_heavy_cap + eps)
    if not light_ok:
        ok &= ranked.light_off
    if not heavy_ok:
        ok &= ranked.heavy_off
    return ok


def _solve_exact(cascade, gpus, demand, light, heavy, ranked, mode, objective, waits) -> Optional[Plan]:
    """The MILP's optimum without the MILP: all candidates at once in numpy, then the chosen one's pairs.

    Why this is exact: once the candidate (hence each stage's load) and the two batch sizes are fixed, the
    only decisions left are the worker counts, and each stage independently takes its fewest workers that
    carry its load, ``max(1, ceil(load / cap))`` (a stage with no load is off); any more only adds GPUs to
    the objective. So a (candidate, batch pair) is feasible iff those counts fit the GPUs and the pair's
    path meets the SLO. The objective ranks the candidate first, so the optimum lies with the best-ranked
    candidate that has any feasible pair, whatever the others do (no monotonicity is assumed); among that
    candidate's feasible pairs it has the fewest GPUs, then the lowest summed batch time, which are the
    MILP's second and third terms. Exact ties on both go to the smallest light, then heavy batch size.
    """
    slo = cascade.slo_s
    coupled = mode == "cascade"
    light_ok, heavy_ok = _batch_options(light, heavy, coupled, slo)
    if gpus == 0:
        return None
    servable = _servable(ranked, demand, gpus, light, heavy, light_ok, heavy_ok)
    if not servable.any():
        return None
    nl, nh = len(light_ok), len(heavy_ok)
    # Workers per candidate and option; an option is a usable batch size, then "off" (no workers, no
    # latency); inf where the candidate cannot take it (a stage it sends traffic to cannot be off, one it
    # sends none to cannot run). The light stage also gets a last "none" column, inf for every candidate.
    wl = _fewest_workers(light, light_ok, demand, ranked.light, ranked.light_off, ranked.light_off_cost, 1)
    wh = _fewest_workers(heavy, heavy_ok, demand, ranked.heavy, ranked.heavy_off, ranked.heavy_off_cost, 0)
    path_l = [light.path_s[i] for i in light_ok] + [0.0]
    path_h = [heavy.path_s[i] for i in heavy_ok] + [0.0]
    # In cascade mode a deferred query pays both paths (off adds nothing); otherwise each path alone meets
    # the SLO, as _batch_options kept only such batch sizes.
    slo_rows = [[not coupled or pl + ph <= slo for ph in path_h] for pl in path_l]
    # Which candidates have a feasible pair, without trying every pair: for a heavy option, the light
    # batch size of most capacity among those that meet the SLO with it needs the fewest light workers,
    # for every candidate at once (the count never rises with capacity), so it alone decides.
    cap_l = [light.capacity[i] for i in light_ok]
    partner = []
    for jh in range(nh + 1):
        fits = [jl for jl in range(nl) if slo_rows[jl][jh]]
        partner.append(max(fits, key=cap_l.__getitem__) if fits else nl + 1)
    fewest_light = np.minimum(wl[:, partner], wl[:, nl:nl + 1])  # the off column wins where light is off
    per_cand = ((fewest_light + wh) <= gpus).any(axis=1) & servable
    if not per_cand.any():
        return None
    k = int(np.argmax(per_cand))  # the best-ranked candidate with a feasible pair
    # Among its feasible pairs (at most 7 x 7): fewest GPUs, then least summed batch time, then the first
    # in (light batch, heavy batch) order.
    row_l, row_h = wl[k].tolist(), wh[k].tolist()
    batch_l = [light.latency_s[i] for i in light_ok] + [0.0]
    batch_h = [heavy.latency_s[i] for i in heavy_ok] + [0.0]
    _, _, jl, jh = min(
        (row_l[a] + row_h[b], batch_l[a] + batch_h[b], a, b)
        for a in range(nl + 1) for b in range(nh + 1)
        if slo_rows[a][b] and row_l[a] + row_h[b] <= gpus
    )
    # The last option is "off" (no workers).
    light_plan = _stage_plan(cascade, "light", light, light_ok[jl] if jl < nl else None, int(wl[k, jl]))
    heavy_plan = _stage_plan(cascade, "heavy", heavy, heavy_ok[jh] if jh < nh else None, int(wh[k, jh]))
    return _plan(cascade, gpus, demand, light_plan, heavy_plan, ranked.candidate(k), mode, objective, waits, True, "")


def _fewest_workers(stage: _Stage, ok: list[int], demand: float, fraction: np.ndarray, off: np.ndarray,
                    off_cost: np.ndarray, extra: int) -> np.ndarray:
    """Workers each candidate needs on each usable batch size of a stage, then on "off", then inf in
    ``extra`` columns (options no candidate can use).

    A stage is on iff the candidate sends it a fraction of the demand (as the MILP's ``y`` rows say), and
    then it has at least one worker even at zero demand; off costs nothing (``off_cost``: 0 where the
    stage is off, inf where it is not). The rounding is ``_workers_for``'s, element for element.
    """
    n = len(ok)
    out = np.full((len(fraction), n + 1 + extra), np.inf)
    if n:
        need = out[:, :n]
        np.divide((demand * fraction)[:, None], [stage.capacity[i] for i in ok], out=need)
        need -= 1e-9
        np.ceil(need, out=need)
        np.maximum(need, 1.0, out=need)
        need[off] = np.inf
    out[:, n] = off_cost
    return out


class _ConstraintRows:
    """A MILP's constraint rows, added one at a time: ``low <= sum(coeffs[k] * x[k]) <= high``."""

    def __init__(self, n_vars: int):
        self.n_vars = n_vars
        self.rows: list[np.ndarray] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, coeffs: dict[int, float], low: float, high: float) -> None:
        row = np.zeros(self.n_vars)
        for k, v in coeffs.items():
            row[k] += v
        self.rows.append(row)
        self.lo.append(low)
        self.hi.append(high)

    def constraint(self) -> LinearConstraint:
        return LinearConstraint(np.array(self.rows), np.array(self.lo), np.array(self.hi))


def _solve_milp(cascade, gpus, demand, light, heavy, ranked, mode, objective, waits) -> Optional[Plan]:
    slo = cascade.slo_s
    coupled = mode == "cascade"  # in cascade mode a deferred query pays both stages' latency
    light_ok, heavy_ok = _batch_options(light, heavy, coupled, slo)
    if gpus == 0:
        return None
    # Candidates whose demand on a stage can never be met are dropped up front (keeps the MILP small).
    servable = _servable(ranked, demand, gpus, light, heavy, light_ok, heavy_ok)
    cands = [c for c, keep in zip(ranked.cands, servable) if keep]
    cands = _up_to_incumbent(cands, demand, gpus, light, heavy, light_ok, heavy_ok, coupled, slo)
    if not cands:
        return None
    max_lf = max(c.light_fraction for c in cands)
    max_hf = max(c.heavy_fraction for c in cands)

    def bound(stage: _Stage, i: int, frac: float) -> int:
        need = math.ceil(demand * frac / stage.capacity[i] - 1e-9) if frac > 0 else 0
        return max(1, min(gpus, need))

    nl, nh, nk = len(light_ok), len(heavy_ok), len(cands)
    # Variable layout: [yL (nl), xL (nl), yH (nh), xH (nh), z (nk)]
    iyL, ixL, iyH, ixH, iz = 0, nl, 2 * nl, 2 * nl + nh, 2 * nl + 2 * nh
    n = iz + nk
    lb = np.zeros(n)
    ub = np.ones(n)
    for j, i in enumerate(light_ok):
        ub[ixL + j] = bound(light, i, max_lf)
    for j, i in enumerate(heavy_ok):
        ub[ixH + j] = bound(heavy, i, max_hf)
    integrality = np.ones(n)

    rows = _ConstraintRows(n)
    add = rows.add

    add({iz + k: 1.0 for k in range(nk)}, 1, 1)
    # Stage used iff its batch binary is set; it is needed iff the chosen candidate sends it traffic.
    light_needed = {iz + k: -1.0 for k, c in enumerate(cands) if c.light_fraction > 0}
    heavy_needed = {iz + k: -1.0 for k, c in enumerate(cands) if c.heavy_fraction > 0}
    add({**{iyL + j: 1.0 for j in range(nl)}, **light_needed}, 0, 0 if not coupled else np.inf)
    add({iyL + j: 1.0 for j in range(nl)}, 0 if not coupled else 1, 1)
    add({**{iyH + j: 1.0 for j in range(nh)}, **heavy_needed}, 0, np.inf)
    add({iyH + j: 1.0 for j in range(nh)}, 0, 1)
    for j in range(nl):
        add({ixL + j: 1.0, iyL + j: -1.0}, 0, np.inf)
        add({ixL + j: 1.0, iyL + j: -ub[ixL + j]}, -np.inf, 0)
    for j in range(nh):
        add({ixH + j: 1.0, iyH + j: -1.0}, 0, np.inf)
        add({ixH + j: 1.0, iyH + j: -ub[ixH + j]}, -np.inf, 0)
    add({**{ixL + j: 1.0 for j in range(nl)}, **{ixH + j: 1.0 for j in range(nh)}}, 0, gpus)
    add(
        {**{ixL + j: light.capacity[i] for j, i in enumerate(light_ok)},
         **{iz + k: -demand * c.light_fraction for k, c in enumerate(cands)}},
        0, np.inf,
    )
    add(
        {**{ixH + j: heavy.capacity[i] for j, i in enumerate(heavy_ok)},
         **{iz + k: -demand * c.heavy_fraction for k, c in enumerate(cands)}},
        0, np.inf,
    )
    if coupled:
        add(
            {**{iyL + j: light.path_s[i] for j, i in enumerate(light_ok)},
             **{iyH + j: heavy.path_s[i] for j, i in enumerate(heavy_ok)}},
            -np.inf, slo,
        )

    # Lexicographic objective: rank, then GPUs, then latency (normalised into [0, 1)).
    lat_norm = 2.0 * (slo + max(light.path_s + heavy.path_s, default=0.0)) + 1.0
    c = np.zeros(n)
    c[iz:iz + nk] = np.arange(nk) * (gpus + 2)
    c[ixL:ixL + nl] = 1.0
    c[ixH:ixH + nh] = 1.0
    for j, i in enumerate(light_ok):
        c[iyL + j] = light.latency_s[i] / lat_norm
    for j, i in enumerate(heavy_ok):
        c[iyH + j] = heavy.latency_s[i] / lat_norm

    res = milp(
        c,
        integrality=integrality,
        bounds=Bounds(lb, ub),
        constraints=rows.constraint(),
        options={"mip_rel_gap": 0.0, "presolve": True},
    )
    if res.status != 0 or res.x is None:
        return None
    x = np.round(res.x).astype(int)
    k = int(np.argmax(x[iz:iz + nk]))
    cand = cands[k]
    light_plan, heavy_plan = (_stage_plan(cascade, role, stage, *_milp_choice(ok, x[iy:iy + len(ok)], x[ix:ix + len(ok)]))
                              for role, stage, ok, iy, ix in (("light", light, light_ok, iyL, ixL),
                                                               ("heavy", heavy, heavy_ok, iyH, ixH)))
    return _plan(cascade, gpus, demand, light_plan, heavy_plan, cand, mode, objective, waits, True, "")


def _workers_for(stage: _Stage, i: int, load: float) -> int:
    return math.ceil(load / stage.capacity[i] - 1e-9) if load > 0 else 0


def _up_to_incumbent(cands, demand, gpus, light, heavy, light_ok, heavy_ok, coupled, slo):
    """Drop the candidates ranked below a known feasible one (a primal bound; exact, not a heuristic).

    The incumbent is the best-ranked candidate that one fixed choice of batch sizes can serve within the
    GPUs: each stage's highest-throughput batch size (the heavy one among those that meet the SLO after
    that light batch). No candidate ranked below it can be optimal, so the MILP only has to decide among
    it and the better-ranked ones, with every batch size and worker count still open.
    """
    if not light_ok and coupled:
        return cands
    best_l = max(light_ok, key=lambda i: light.capacity[i]) if light_ok else None
    if coupled:
        fits = [i for i in heavy_ok if light.path_s[best_l] + heavy.path_s[i] <= slo]
    else:
        fits = heavy_ok
    best_h = max(fits, key=lambda i: heavy.capacity[i]) if fits else None
    for k, c in enumerate(cands):
        need = 0
        if c.light_fraction > 0:  # a stage that gets traffic has a worker, even at zero demand
            if best_l is None:
                continue
            need = max(1, _workers_for(light, best_l, demand * c.light_fraction))
        if c.heavy_fraction > 0:
            if best_h is None:
                continue
            need += max(1, _workers_for(heavy, best_h, demand * c.heavy_fraction))
        if need <= gpus:
            return cands[:k + 1]
    return cands


def _milp_choice(ok: list[int], y, x) -> tuple[Optional[int], int]:
    """The batch size (index into the stage) and workers a MILP solution picks for a stage: the option whose
    binary is set, or none."""
    chosen = [j for j in range(len(ok)) if y[j] == 1]
    return (ok[chosen[0]], int(x[chosen[0]])) if chosen else (None, 0)


def _stage_plan(cascade: Cascade, role: str, stage: _Stage, i: Optional[int], workers: int) -> StagePlan:
    """A stage of a plan: ``workers`` workers at the stage's batch size ``i``, or none when ``i`` is None
    or no workers (every solver's answer goes through here)."""
    model = cascade.light_model if role == "light" else cascade.heavy_model
    if i is None or workers == 0:
        return StagePlan(role, model, 0, 0, 0.0, 0.0)
    b, lat = stage.batch_sizes[i], stage.latency_s[i]
    return StagePlan(role, model, workers, b, lat, workers * b / lat)


def _plan(cascade, gpus, demand, light_plan, heavy_plan, cand, mode, objective, waits, feasible, reason) -> Plan:
    batch_wait, (q_light, q_heavy) = waits
    light_path = light_plan.latency_s * (1 + batch_wait) + q_light if light_plan.workers else 0.0
    heavy_path = heavy_plan.latency_s * (1 + batch_wait) + q_heavy if heavy_plan.workers else 0.0
    return _plan_of_paths(cascade, gpus, demand, light_plan, heavy_plan, light_path, heavy_path, cand, mode,
                          objective, feasible, reason)


def _plan_of_paths(cascade, gpus, demand, light_plan, heavy_plan, light_path, heavy_path, cand, mode, objective,
                   feasible, reason, extra=None) -> Plan:
    """The plan of these stages, given each stage's path latency (batch time, waits, queueing delay)."""
    if mode == "cascade":
        latency = light_path + (heavy_path if cand.heavy_fraction > 0 else 0.0)
        threshold, light_share = cand.key, 1.0
    else:
        latency = max(light_path, heavy_path)
        threshold, light_share = 0.0, cand.light_fraction
    return Plan(
        cascade=cascade.name,
        mode="cascade" if mode == "cascade" else "split",
        stages=(light_plan, heavy_plan),
        threshold=threshold,
        light_share=light_share,
        deferral_fraction=cand.heavy_fraction,
        expected_fid=cand.fid,
        predicted_latency_s=latency,
        demand_qps=demand,
        gpus=gpus,
        feasible=feasible,
        reason=reason,
        objective=objective,
        extra={} if extra is None else extra,
    )


def _best_effort(cascade, gpus, demand, light, heavy, mode, objective, waits) -> Plan:
    """All GPUs on the light model (the heavy one in heavy-only mode), nothing deferred, at the batch size
    of most throughput among those profiled (ties: the smaller batch, which is faster).

    No plan meets the SLO here, so the fallback keeps the most throughput, SLO or not: it drains the
    backlog fastest, and the backlog is what the next plan's queueing delay is computed from. Taking the
    fastest batch instead (batch 1 once queueing pushes every batch past the SLO) halves the capacity just
    when it is most needed: on the shipped trace with one GPU that dropped 2,252 queries instead of 735.
    """
    slo = cascade.slo_s
    heavy_only = mode == "heavy-only"
    stage = heavy if heavy_only else light
    role = "heavy" if heavy_only else "light"
    model = cascade.light_model if role == "light" else cascade.heavy_model
    fits = [i for i, p in enumerate(stage.path_s) if p <= slo]
    if not stage.batch_sizes:
        sp = StagePlan(role, model, 0, 0, 0.0, 0.0)
        reason = f"no allowed batch size of the {role} model has a latency in the profile"
    else:
        i = max(range(len(stage.batch_sizes)), key=lambda i: (stage.capacity[i], -stage.batch_sizes[i]))
        sp = StagePlan(role, model, gpus, stage.batch_sizes[i], stage.latency_s[i],
                       gpus * stage.batch_sizes[i] / stage.latency_s[i])
        reason = _why(cascade, gpus, demand, stage, role, fits)
    empty_role = "light" if heavy_only else "heavy"
    empty = StagePlan(empty_role, cascade.heavy_model if empty_role == "heavy" else cascade.light_model, 0, 0, 0.0, 0.0)
    stages = (empty, sp) if heavy_only else (sp, empty)
    if mode == "cascade":
        cand = _Candidate(0.0, 0.0, 1.0, cascade.fid(1.0))
    elif heavy_only:
        cand = _Candidate(1.0, 1.0, 0.0, cascade.random_mix_fid(0.0))
    else:
        cand = _Candidate(0.0, 0.0, 1.0, cascade.random_mix_fid(1.0))
    return _plan(cascade, gpus, demand, stages[0], stages[1], cand, mode, objective, waits, False, reason)


def _why(cascade, gpus, demand, stage, role, fits) -> str:
    """Why no plan is feasible, from the stage the best-effort plan runs (the others only add load)."""
    if gpus == 0:
        return "no GPUs to allocate"
    if not fits:
        best = min(stage.path_s)
        return (f"no batch size of the {role} model meets the {cascade.slo_s:g} s SLO "
                f"(fastest: {best:.3f} s with queueing)")
    # The capacity the solvers could plan with: batch sizes within the SLO, at the utilisation cap.
    i = max(fits, key=lambda i: (stage.capacity[i], -stage.batch_sizes[i]))
    usable = gpus * stage.capacity[i]
    if demand > usable + 1e-9:
        b, lat = stage.batch_sizes[i], stage.latency_s[i]
        cap = f"{usable:.2f} qps at batch {b}"
        utilization = stage.capacity[i] * lat / b
        if utilization < 1:
            cap += f", {utilization:g} utilisation"
        return f"demand {demand:.2f} qps exceeds the {role} model's capacity on {gpus} GPUs within the SLO ({cap})"
    return "no threshold on the grid lets the heavy stage keep up within the GPU and latency limits"


def _with_solve_ms(plan: Plan, ms: float) -> Plan:
    """The plan with its solve time. The plan was built by this call and nobody else holds it yet, so it is
    set in place (the frozen-dataclass idiom); ``dataclasses.replace`` would cost more than the exact solve."""
    object.__setattr__(plan, "solve_ms", ms)
    return plan


# ----------------------------------------------------------------------------------------------
# Plan-dependent queueing delay (queue_model "mean" or "tail")


# In tail mode a deferred query's path is planned to at least its median, however little is deferred.
_LEAST_PATH_QUANTILE = 0.5


@dataclass(frozen=True)
class _Queueing:
    """How a stage's delay depends on the plan: the model's inputs besides load, workers and batch size."""

    quantile: Optional[float]  # None: the mean wait ("mean"); else the quantile of all queries' latency ("tail")
    routing: str
    backlog: tuple[float, float]  # queued queries, light and heavy: their drain is part of the delay
    batch_wait: float
    max_utilization: float
    keep: tuple[bool, bool] = (False, False)  # stages that must run (they hold queued work), light and heavy
    extra_load: tuple[float, float] = (0.0, 0.0)  # queries/s added to each stage's load (a backlog spread out)
    fallback: bool = False  # deferred queries late for their heavy image get their light one (path_rules)

    def path_rules(self, heavy_fractions: np.ndarray, coupled: bool) -> tuple["_PathRule", "_PathRule"]:
        """How each candidate's light and heavy stage paths are planned, so that ``quantile`` of all queries
        meet the SLO (a quantile None: the mean).

        In cascade mode only the deferred fraction f pays both stages: if a share v of them is late, a
        share f v of all queries is, so the deferred path needs the quantile ``1 - (1 - p) / f`` (0.98 for
        p = 0.99 and half the queries deferred), at least the median; with nothing deferred the light path
        alone gets ``p``. Each stage is planned to that quantile and their sum meets the SLO: the sum of
        two quantiles bounds the quantile of the sum from above for the positively related delays of a
        cascade, so this errs on the safe side. In split mode each path gets ``p``.

        With a light fallback (``fallback``, cascade mode) a deferred query whose heavy image would be late
        is answered with its light image on time: every query's SLO then rests on the light path alone,
        which must meet the SLO at ``p`` (a gate on the light table), and the heavy stage's waits cost
        images served light, not violations. A heavy queue cannot grow past what its workers finish in time
        (the rest is answered light), so the heavy stage is planned to its capacity (at the utilisation cap,
        no queueing delay), and the deferred path to its mean: the light stage's mean latency plus the
        heavy batch time within the SLO. Holding each heavy worker to the low utilisation its own queue's
        tail needs under random routing would cost heavy images where no violation is at stake. (With the
        ``mean`` model the same, without the gate.)
        """
        n = len(heavy_fractions)
        if coupled and self.fallback:
            gate = None if self.quantile is None else np.full(n, self.quantile)
            return _PathRule(None, gate=gate), _PathRule(None, wait=False)
        if self.quantile is None:
            return _PathRule(None), _PathRule(None)
        p = self.quantile
        if not coupled:
            return _PathRule(np.full(n, p)), _PathRule(np.full(n, p))
        f = np.asarray(heavy_fractions, dtype=float)
        with np.errstate(divide="ignore"):
            deferred = np.where(f > 0, 1.0 - (1.0 - p) / np.where(f > 0, f, 1.0), p)
        both = _PathRule(np.maximum(deferred, _LEAST_PATH_QUANTILE))
        return both, both


@dataclass(frozen=True)
class _PathRule:
    """How one stage's path table is computed for a group of candidates (:func:`_stage_paths`)."""

    quantiles: Optional[np.ndarray]  # per candidate, the quantile of the wait planned to; None: the mean wait
    wait: bool = True  # False: no queueing delay, the batch time alone (the stage planned to its capacity)
    gate: Optional[np.ndarray] = None  # per candidate: an entry whose path at this quantile exceeds the SLO is out


def _queueing(queue_model, backlog, routing, tail_quantile, batch_wait, max_utilization,
              fallback: str = "none") -> Optional[_Queueing]:
    """The checked settings of a plan-dependent delay model; None for ``little`` (a constant delay)."""
    if queue_model not in QUEUE_MODELS:
        raise DiffsimError(f"unknown queue model {queue_model!r} (choose from {', '.join(QUEUE_MODELS)})")
    if len(backlog) != 2 or any(not math.isfinite(q) or q < 0 for q in backlog):
        raise DiffsimError(f"backlog must be two counts >= 0 (light, heavy), got {backlog!r}")
    if routing not in ("random", "least-loaded"):
        raise DiffsimError(f"unknown routing {routing!r} (choose from random, least-loaded)")
    if not 0 < tail_quantile < 1:
        raise DiffsimError(f"tail_quantile must lie in (0, 1), got {tail_quantile!r}")
    if fallback not in FALLBACKS:
        raise DiffsimError(f"unknown fallback {fallback!r} (choose from {', '.join(FALLBACKS)})")
    if queue_model == "little":
        return None
    quantile = tail_quantile if queue_model == "tail" else None
    return _Queueing(quantile, routing, (float(backlog[0]), float(backlog[1])), batch_wait, max_utilization,
                     (backlog[0] > 0, backlog[1] > 0), fallback=fallback == "light")


def _queued_options(light: _Stage, heavy: _Stage, coupled: bool, slo: float) -> tuple[list[int], list[int]]:
    """Batch sizes that could meet the SLO with no queueing at all (in cascade mode a heavy one after the
    fastest light one). No batch size is dropped as dominated here: with a delay that depends on the batch
    size through the queue's number of slots, a slower batch size with less capacity can still wait less."""
    light_ok = [i for i, p in enumerate(light.path_s) if p <= slo]
    if coupled:
        fastest = min((light.path_s[i] for i in light_ok), default=math.inf)
        heavy_ok = [i for i, p in enumerate(heavy.path_s) if p + fastest <= slo]
    else:
        heavy_ok = [i for i, p in enumerate(heavy.path_s) if p <= slo]
    return light_ok, heavy_ok


def _cap_s(slo: float) -> float:
    """The value a path gets where the plan cannot be (too few workers for the load, no steady state):
    anything above the SLO is infeasible whatever the other stage does, and a finite cap keeps the MILP's
    coefficients finite."""
    return 2.0 * slo + 1.0


def _stage_paths(stage: _Stage, ok: list[int], loads: np.ndarray, backlog: float, q: _Queueing, slo: float,
                 rule: _PathRule, first: int, width: int) -> np.ndarray:
    """``path[k, j, i]``: the latency of stage option ``ok[j]`` on ``n = first + i`` workers (a window of
    ``width`` worker counts; the full table is ``first`` 0 and ``width`` gpus + 1) for load ``loads[k]``
    queries/s: batch time x (1 + batch_wait) + the plan-dependent delay
    (:func:`diffsim.runtime.queueing.stage_delay`: the mean, or candidate k's quantile in
    ``rule.quantiles``; none where ``rule.wait`` is False), capped at :func:`_cap_s`, and at the cap
    where ``rule.gate`` is given and the path with the delay at that quantile exceeds the SLO.

    The cap also marks the worker counts a plan cannot have: none (a stage that runs has a worker), and
    fewer than the load needs at the utilisation cap, :func:`_queued_need` (the rounding of the little
    model's solvers). The path is made non-increasing in ``n`` (a running minimum): a worker more never
    makes a stage slower, as it could idle; the model already is, up to rounding. Both solvers read this
    one table, so they judge every (candidate, batch size, workers) by the same number. A window must start
    at or below every row's fewest workers: the counts it leaves out are all at the cap, so its running
    minimum is the full table's, entry for entry.
    """
    cap = _cap_s(slo)
    loads = np.asarray(loads, dtype=float)
    if not ok:
        return np.full((len(loads), 0, width), cap)
    n = np.arange(first, first + width, dtype=float)
    b = np.array([stage.batch_sizes[i] for i in ok], dtype=float)
    lat = np.array([stage.latency_s[i] for i in ok])
    # One load for every candidate (the light stage in cascade mode): its queue is computed once, and only
    # the quantile, if any, per candidate (stage_delay broadcasts).
    lam = loads[:1] if len(loads) > 1 and (loads == loads[0]).all() else loads

    def delay(quantiles):
        quantile = None if quantiles is None else np.asarray(quantiles, dtype=float)[:, None, None]
        return stage_delay(lam[:, None, None], n[None, None, :], b[None, :, None], lat[None, :, None],
                           routing=q.routing, backlog=backlog, quantile=quantile)

    batch = lat[None, :, None] * (1.0 + q.batch_wait)
    path = batch + delay(rule.quantiles) if rule.wait else np.broadcast_to(batch, (len(lam), len(ok), width))
    if rule.gate is not None:
        path = np.where(batch + delay(rule.gate) > slo, cap, path)
    need = _queued_need(stage, ok, loads)
    path = np.where(n[None, None, :] < need[:, :, None], cap, np.minimum(path, cap))
    return np.minimum.accumulate(path, axis=2)


def _queued_need(stage: _Stage, ok: list[int], loads: np.ndarray) -> np.ndarray:
    """``need[k, j]``: the fewest workers of option ``ok[j]`` that carry load ``loads[k]`` at the utilisation
    cap, ``max(1, ceil(load / (U cap)))``; below it a path is at the cap."""
    usable = np.array([stage.capacity[i] for i in ok], dtype=float).reshape(1, len(ok))  # per worker
    need = np.where(loads[:, None] > 0, np.ceil(loads[:, None] / usable - 1e-9), 1.0)
    return np.maximum(need, 1.0)


def _candidate_paths(ks: np.ndarray, ranked: _Ranked, demand: float, light: _Stage, heavy: _Stage, light_ok, heavy_ok,
                     q: _Queueing, coupled: bool, slo: float, first: tuple[int, int], width: tuple[int, int]):
    """Both stages' path tables (:func:`_stage_paths`) of candidates ``ks``, light then heavy: each
    candidate's load on each stage (a fraction of the demand, plus any spread backlog) at its quantile.
    Both solvers build their tables here, so they read the same numbers."""
    rule_l, rule_h = q.path_rules(ranked.heavy[ks], coupled)
    loads_l, loads_h = _queued_loads(ranked, ks, demand, q)
    return (_stage_paths(light, light_ok, loads_l, q.backlog[0], q, slo, rule_l, first[0], width[0]),
            _stage_paths(heavy, heavy_ok, loads_h, q.backlog[1], q, slo, rule_h, first[1], width[1]))


def _queued_loads(ranked: _Ranked, ks, demand: float, q: _Queueing) -> tuple[np.ndarray, np.ndarray]:
    return demand * ranked.light[ks] + q.extra_load[0], demand * ranked.heavy[ks] + q.extra_load[1]


def _allocate_queued(cascade, gpus, demand, light, heavy, ranked, mode, objective, q: _Queueing, solver) -> Plan:
    """Solve with plan-dependent delays.

    When no plan meets the SLO with the backlog's drain counted, the backlog is late under any plan (its
    oldest queries will be dropped at the stages rather than served in time), and planning as if every new
    query waited behind all of it would only swap roles back and forth between an all-light fallback and
    the plan that fits once the queue is gone. The plan is then made again with the backlog spread over one
    SLO as extra load on its stage (``backlog / SLO`` queries/s: the stage is sized to work it off while
    serving new arrivals) instead of as a drain delay, every stage that holds queued work still running,
    and reported infeasible with that reason. Only when that fails too is it the best-effort plan."""
    slo = cascade.slo_s
    coupled = mode == "cascade"
    light_ok, heavy_ok = _queued_options(light, heavy, coupled, slo)
    plan = None
    if gpus > 0:
        servable = _servable(ranked, demand, gpus, light, heavy, light_ok, heavy_ok)
        # A stage with a backlog runs whatever the candidate: none can if that stage has no usable batch size.
        if (q.keep[0] and not light_ok) or (q.keep[1] and not heavy_ok):
            servable = np.zeros_like(servable)
        solve = _solve_queued_exact if solver == "exact" else _solve_queued_milp
        attempts = [(q, "")]
        if any(q.backlog):
            spread = (q.backlog[0] / slo, q.backlog[1] / slo)
            attempts.append((replace(q, backlog=(0.0, 0.0), extra_load=spread), (
                f"no plan drains the backlog ({q.backlog[0]:g} light, {q.backlog[1]:g} heavy queued) within the "
                f"SLO: planned with it spread over one SLO as extra load, every stage that holds queued work running")))
        for attempt, reason in attempts:
            found = solve(cascade, gpus, demand, light, heavy, light_ok, heavy_ok, ranked, servable, coupled, attempt)
            if found is not None:
                k, jl, nl, jh, nh, path_l, path_h = found
                plan = _queued_plan(cascade, gpus, demand, light, heavy, light_ok, heavy_ok, ranked.candidate(k), mode,
                                    objective, (jl, nl, path_l), (jh, nh, path_h), reason)
                break
    if plan is None:
        plan = _best_effort_queued(cascade, gpus, demand, light, heavy, mode, objective, q)
    return plan


# The window of worker counts the exact solver first computes a candidate's paths over, from the fewest
# workers each stage needs at the utilisation cap; widened (up to all GPUs) for a candidate whose best plan
# may lie beyond it.
_WINDOW = 32
_GROWTH = 8  # each widening multiplies the window by this: few steps to all GPUs when a plan needs them
_TABLE_ELEMENTS = 32_768  # a widened group is split so that a stage's tables hold about this many entries
_BEYOND = "beyond the window"  # _first_answer's answer when the windows cannot tell


def _first_answer(pl: np.ndarray, first_l: int, ph: np.ndarray, first_h: int, on_l: np.ndarray, on_h: np.ndarray,
                  gpus: int, slo: float, coupled: bool):
    """The first candidate (row) with an answer, ``(row, answer, end)``, or None when none has one. An
    answer is the candidate's best options and worker counts ``(jl, nl, jh, nh)`` (None and 0 for a stage
    that is off), or ``_BEYOND`` when the windows of worker counts are too narrow to tell whether it has
    one; then rows ``row`` to ``end - 1`` have nothing that fits in the windows (the run to widen).

    ``pl[k]`` / ``ph[k]``: candidate k's path tables ``[option, n - first]`` over a window of worker counts
    (:func:`_stage_paths`), non-increasing in n; ``on_l[k]`` / ``on_h[k]``: whether the stage runs (a
    stage that is off has no workers and no latency). Best: fewest GPUs first, then the least summed path
    (the MILP's second and third terms); then the smallest light option, then heavy; then, among splits
    that tie, the fewest light workers. Candidates with two running stages are first screened all at once
    (:func:`_pairs_that_fit`); only one that passes is searched in full (:func:`_best_pair`).
    """
    # With both stages running, each has at least the other's first count of workers beside it, so a
    # window reaching the GPUs less that count holds every count a plan can have.
    reach_l, reach_h = first_l + pl.shape[2] - 1, first_h + ph.shape[2] - 1
    complete = reach_l + first_h >= gpus and reach_h + first_l >= gpus
    both = on_l & on_h
    fit = _pairs_that_fit(pl[both], first_l, ph[both], first_h, gpus, slo, coupled)
    some = np.zeros(len(pl), dtype=bool)  # something fits in the windows
    some[both] = fit.reshape(len(fit), -1).any(axis=1) if fit.size else False
    alone = np.flatnonzero(on_l != on_h)
    if len(alone):
        some[alone] = [((pl[k] if on_l[k] else ph[k]) <= slo).any() for k in alone]
    for k in range(len(pl)):
        if both[k]:
            found = _best_pair(pl[k], first_l, ph[k], first_h, gpus, slo, coupled) if some[k] else None
            if found is None and not complete:
                found = _BEYOND  # nothing fits within the windows: wider ones may hold a plan
        elif on_l[k]:
            found = _best_alone(pl[k], first_l, gpus, slo)
            found = (*found, None, 0) if isinstance(found, tuple) else found
        elif on_h[k]:
            found = _best_alone(ph[k], first_h, gpus, slo)
            found = (None, 0, *found) if isinstance(found, tuple) else found
        else:
            found = None
        if found is not None:
            later = np.flatnonzero(some[k + 1:])
            return k, found, k + 1 + (int(later[0]) if len(later) else len(pl) - k - 1)
    return None


def _pairs_that_fit(pl: np.ndarray, first_l: int, ph: np.ndarray, first_h: int, gpus: int, slo: float,
                    coupled: bool) -> np.ndarray:
    """``fit[k, jl, jh]``: whether some light count in the window has, within the heavy window and the GPUs
    left, a heavy count that meets its budget: the rows :func:`_best_pair` would find usable (its ``ok``),
    without searching. As ``ph`` is non-increasing, the fewest heavy workers that meet a budget are at most
    X iff ``ph[X]`` meets it, so checking the most heavy workers allowed is enough."""
    n_k, n_l, width_l = pl.shape
    n_h, width_h = ph.shape[1:]
    if not (n_k and n_l and n_h):
        return np.zeros((n_k, n_l, n_h), dtype=bool)
    budget = slo - pl if coupled else np.where(pl <= slo, slo, -np.inf)
    n_light = first_l + np.arange(width_l)
    most_h = np.minimum(gpus - n_light, first_h + width_h - 1) - first_h  # index of the most heavy workers allowed
    room = most_h >= 0
    at_most = ph[:, :, np.minimum(np.maximum(most_h, 0), width_h - 1)]  # [k, jh, i]
    ok = (pl <= slo)[:, :, None, :] & room & (at_most[:, None, :, :] <= budget[:, :, None, :])
    return ok.any(axis=3)


def _best_alone(path: np.ndarray, first: int, gpus: int, slo: float):
    """One running stage: its first option with the fewest workers within the SLO, then the least path,
    ``(j, n)``; None or ``_BEYOND`` as in :func:`_first_answer`. Exact on a window: the counts below
    ``first`` are at the cap, so the first fit in the window is the first fit."""
    fits = path <= slo
    found = fits.any(axis=1)
    if not found.any():
        return None if first + path.shape[1] > gpus else _BEYOND
    opts = np.flatnonzero(found)
    at = fits[opts].argmax(axis=1)  # the first fit is the fewest workers (path is non-increasing)
    j = int(opts[np.lexsort((path[opts, at], at))[0]])  # fewest workers, then least path, then first option
    return j, first + int(fits[j].argmax())


def _best_pair(pl: np.ndarray, first_l: int, ph: np.ndarray, first_h: int, gpus: int, slo: float, coupled: bool):
    """One candidate's best ``(jl, nl, jh, nh)`` when both its stages run, or None (see
    :func:`_first_answer`), all option pairs at once.

    For every light count, the fewest heavy workers within its budget (``ph`` is non-increasing, so one
    ``searchsorted`` per heavy option), the least total per pair, then the least summed path among the
    splits of that total that meet the SLO.

    Exact on a window: counts below ``first`` are at the cap (infeasible), and an answer of T GPUs with
    ``T <= first_l + first_h + width - 1`` (per stage) has both its counts, and every split of T the
    search compares, inside the windows; a pair whose best is beyond that has more GPUs than the answer.
    None here means none within that bound (none at all once the bound reaches the GPUs).
    """
    n_l, width_l = pl.shape
    n_h, width_h = ph.shape
    budget = slo - pl if coupled else np.where(pl <= slo, slo, -np.inf)
    # m[jl, jh, i]: index of the fewest heavy workers whose path fits light count first_l + i's budget.
    queries = -budget.ravel()
    m = np.empty((n_l, n_h, width_l), dtype=np.int64)
    for jh in range(n_h):
        m[:, jh, :] = np.searchsorted(-ph[jh], queries, side="left").reshape(n_l, width_l)
    n_light = first_l + np.arange(width_l)
    fewest_h = first_h + m
    total = n_light + fewest_h
    ok = (pl <= slo)[:, None, :] & (m < width_h) & (total <= gpus)
    best = np.where(ok, total, gpus + 1).min(axis=2)  # per pair
    reach_l, reach_h = first_l + width_l - 1, first_h + width_h - 1  # the last counts computed
    horizon = min(reach_l + first_h, reach_h + first_l, gpus)
    # Every split of the pair's best total that fits: the least summed path among them.
    n_heavy = best[:, :, None] - n_light
    split = ok & (n_heavy >= fewest_h) & (n_heavy >= 0) & (best <= horizon)[:, :, None]
    ph_at = ph[np.arange(n_h)[None, :, None], np.minimum(np.maximum(n_heavy - first_h, 0), width_h - 1)]
    sums = pl[:, None, :] + ph_at
    split &= (sums <= slo) if coupled else (pl <= slo)[:, None, :] & (ph_at <= slo)
    if not split.any():
        return None
    sums = np.where(split, sums, np.inf)
    at = sums.argmin(axis=2)  # the fewest light workers among equal sums
    least = np.take_along_axis(sums, at[:, :, None], axis=2)[:, :, 0]
    pairs = np.flatnonzero(split.any(axis=2).ravel())
    p = int(pairs[np.lexsort((least.ravel()[pairs], best.ravel()[pairs]))[0]])  # ties: the first (jl, jh)
    jl, jh = divmod(p, n_h)
    nl = first_l + int(at[jl, jh])
    return jl, nl, jh, int(best[jl, jh]) - nl


def _solve_queued_exact(cascade, gpus, demand, light, heavy, light_ok, heavy_ok, ranked, servable, coupled, q):
    """The best-ranked candidate with any feasible plan; among its plans the fewest GPUs, then the least
    summed path, then the smallest light batch size, then heavy (an off stage last), then the fewest light
    workers. Exact, as in the little model: once the candidate is fixed nothing else constrains a pair.

    Candidates are tried in rank order and the search stops at the first feasible one. What keeps it cheap:
    candidates that could not fit even with no queueing delay at all (each stage at its fewest workers and
    its bare batch time, a bound every path table respects) are skipped without a table; the others' tables
    are computed a few candidates at a time (1, then 4, 16, ...: one ``stage_delay`` call per stage for a
    whole group), over a window of worker counts from the fewest the group needs (:data:`_WINDOW` wide,
    widened for a candidate only when its answer may lie beyond); and :func:`_first_answer` screens all option
    pairs of a group at once.
    """
    if not servable.any():
        return None
    slo = cascade.slo_s
    keep_l, keep_h = q.keep
    loads_l, loads_h = _queued_loads(ranked, slice(None), demand, q)
    # A stage runs when the candidate sends it traffic or it holds queued work (no plan leaves queued work
    # without a worker), and the light stage always in cascade mode; otherwise it is off (a GPU for nothing).
    on_l = (ranked.light > 0) | keep_l | coupled
    on_h = (ranked.heavy > 0) | keep_h
    need_l = _queued_need(light, light_ok, loads_l)
    need_h = _queued_need(heavy, heavy_ok, loads_h)
    tries = np.flatnonzero(servable & _fits_without_delay(light, heavy, light_ok, heavy_ok, need_l, need_h, on_l, on_h,
                                                          gpus, slo, coupled, q.batch_wait))

    def window(ks, on, need):  # (first worker count, width) of a stage's tables for candidates ks
        rows = need[ks][on[ks]]
        if not rows.size:
            return 0, 1  # the stage is off for all of them: its table is not read
        first = int(rows.min())
        return first, max(1, min(_WINDOW, gpus + 1 - first))

    def paths(ks, firsts, widths):
        return _candidate_paths(ks, ranked, demand, light, heavy, light_ok, heavy_ok, q, coupled, slo, firsts, widths)

    def grow(width, first, first_other, on, on_other):  # how many worker counts to add to a stage's window
        if not on.any():
            return 0
        most = gpus - (first_other if on_other.all() else 0)  # the most workers a plan can give the stage
        return max(0, min(first + _GROWTH * width - 1, most) - (first + width - 1))

    def first_fit(ks, firsts, widths, tables):  # the first of ks with a plan, in rank order
        (first_l, first_h), (width_l, width_h), (pl, ph) = firsts, widths, tables
        i = 0
        while i < len(ks):
            first = _first_answer(pl[i:], first_l, ph[i:], first_h, on_l[ks[i:]], on_h[ks[i:]], gpus, slo, coupled)
            if first is None:
                return None
            j, found, end = first
            if found is not _BEYOND:
                jl, nl, jh, nh = found
                path_l = float(pl[i + j, jl, nl - first_l]) if jl is not None else 0.0
                path_h = float(ph[i + j, jh, nh - first_h]) if jh is not None else 0.0
                return int(ks[i + j]), jl, nl, jh, nh, path_l, path_h
            # Wider windows for the run of candidates with nothing in these: the new worker counts only,
            # their running minimum continued from the last count computed (min is exact: the same table as
            # computed at once).
            run = ks[i + j:i + end]
            grow_l = grow(width_l, first_l, first_h, on_l[run], on_h[run])
            grow_h = grow(width_h, first_h, first_l, on_h[run], on_l[run])
            wide = (width_l + grow_l, width_h + grow_h)
            # A few candidates at a time once tables are wide: the first feasible one ends the search.
            step = max(1, _TABLE_ELEMENTS // (max(wide) * max(len(light_ok), len(heavy_ok), 1)))
            for a in range(i + j, i + end, step):
                sub = slice(a, min(a + step, i + end))
                more_l, more_h = paths(ks[sub], (first_l + width_l, first_h + width_h), (grow_l, grow_h))
                wider = (np.concatenate([pl[sub], np.minimum(more_l, pl[sub][:, :, -1:])], axis=2),
                         np.concatenate([ph[sub], np.minimum(more_h, ph[sub][:, :, -1:])], axis=2))
                found = first_fit(ks[sub], firsts, wide, wider)
                if found is not None:
                    return found
            i += end
        return None

    start, size = 0, 1
    while start < len(tries):
        group = tries[start:start + size]
        start, size = start + size, size * 4
        (first_l, width_l), (first_h, width_h) = window(group, on_l, need_l), window(group, on_h, need_h)
        tables = paths(group, (first_l, first_h), (width_l, width_h))
        found = first_fit(group, (first_l, first_h), (width_l, width_h), tables)
        if found is not None:
            return found
    return None


def _fits_without_delay(light, heavy, light_ok, heavy_ok, need_l, need_h, on_l, on_h, gpus, slo, coupled,
                        batch_wait) -> np.ndarray:
    """Mask of the candidates that some option pair could serve if no query ever waited: each running stage
    at its fewest workers (``need``), within the GPUs, and the bare paths (batch time x (1 + batch_wait),
    which no path table goes below) within the SLO, as :func:`_best_pair` checks them. A necessary
    condition, so skipping the others is exact."""
    base_l = np.array([light.latency_s[i] for i in light_ok]) * (1.0 + batch_wait)
    base_h = np.array([heavy.latency_s[i] for i in heavy_ok]) * (1.0 + batch_wait)
    fast_l = (base_l <= slo)[None, :] & (need_l <= gpus)  # (candidate, option)
    fast_h = (base_h <= slo)[None, :] & (need_h <= gpus)
    alone_l = fast_l.any(axis=1)
    alone_h = fast_h.any(axis=1)
    pair_ok = (base_h[None, :] <= slo - base_l[:, None]) if coupled else np.ones((len(base_l), len(base_h)), bool)
    both = ((need_l[:, :, None] + need_h[:, None, :] <= gpus) & pair_ok[None] & fast_l[:, :, None]
            & fast_h[:, None, :]).any(axis=(1, 2))
    return np.where(on_l & on_h, both, np.where(on_l, alone_l, np.where(on_h, alone_h, False)))


def _solve_queued_milp(cascade, gpus, demand, light, heavy, light_ok, heavy_ok, ranked, servable, coupled, q):
    """The formulation of record for plan-dependent delays.

    The delay depends on the worker count, so each (stage, batch size, worker count) gets a binary
    ``w[s,j,n]`` (one-hot: at most one per stage) instead of an integer worker count; the candidate's load
    enters through its path table, which the latency rows read only for the chosen candidate (big-M):

        t_s >= sum_{j,n} path_s[k,j,n] w[s,j,n] - M (1 - z[k])     for every candidate k and stage s
        t_L + t_H <= SLO (cascade)   or   t_L <= SLO, t_H <= SLO (split)

    with ``path`` capped at :func:`_cap_s` (above the SLO) where a plan cannot be, and M = 2 x that cap.
    Minimising ``rank * (G + 2) + sum n w + (t_L + t_H) / norm`` makes each ``t_s`` the chosen plan's path,
    so the third term is the summed path, as in the exact solver. Every other row is the little model's
    (one candidate, stage on iff needed, GPUs, capacity at the utilisation cap). Its size grows with the GPU
    count (2 x batch sizes x G binaries): it is for checking the exact solver on small clusters.
    """
    slo = cascade.slo_s
    cands = [int(k) for k in np.flatnonzero(servable)]
    if not cands:
        return None
    fl = ranked.light[cands]
    fh = ranked.heavy[cands]
    full = gpus + 1
    pl, ph = _candidate_paths(np.array(cands), ranked, demand, light, heavy, light_ok, heavy_ok, q, coupled, slo, (0, 0),
                              (full, full))  # [k, j, n], n = 0..gpus
    nl, nh, nk, g = len(light_ok), len(heavy_ok), len(cands), gpus
    # Variable layout: wL (nl x g, n = 1..g), wH (nh x g), z (nk), tL, tH
    iwl, iwh, iz = 0, nl * g, nl * g + nh * g
    itl, ith = iz + nk, iz + nk + 1
    n_var = ith + 1
    lb, ub = np.zeros(n_var), np.ones(n_var)
    ub[itl] = ub[ith] = slo
    integrality = np.ones(n_var)
    integrality[itl] = integrality[ith] = 0
    workers = np.tile(np.arange(1, g + 1, dtype=float), max(nl, nh))
    big_m = 2.0 * _cap_s(slo)

    rows = _ConstraintRows(n_var)
    add = rows.add

    wl = range(iwl, iwl + nl * g)
    wh = range(iwh, iwh + nh * g)
    add({iz + k: 1.0 for k in range(nk)}, 1, 1)
    # Light: always one option in cascade mode; in split mode on iff the candidate sends it traffic or it
    # has a backlog. Heavy: on when the candidate defers (or splits) to it or it has a backlog, at most once.
    light_needed = {iz + k: -1.0 for k in range(nk) if fl[k] > 0}
    if coupled or q.keep[0]:
        add({i: 1.0 for i in wl}, 1, 1)
    else:
        add({**{i: 1.0 for i in wl}, **light_needed}, 0, 0)
    heavy_needed = {iz + k: -1.0 for k in range(nk) if fh[k] > 0}
    add({i: 1.0 for i in wh}, 1 if q.keep[1] else 0, 1)
    add({**{i: 1.0 for i in wh}, **heavy_needed}, 0, np.inf)
    add({**{i: workers[i - iwl] for i in wl}, **{i: workers[i - iwh] for i in wh}}, 0, gpus)
    cap_l = [light.capacity[i] for i in light_ok]
    cap_h = [heavy.capacity[i] for i in heavy_ok]
    add({**{iwl + j * g + m: (m + 1) * cap_l[j] for j in range(nl) for m in range(g)},
         **{iz + k: -demand * fl[k] for k in range(nk)}}, 0, np.inf)
    add({**{iwh + j * g + m: (m + 1) * cap_h[j] for j in range(nh) for m in range(g)},
         **{iz + k: -demand * fh[k] for k in range(nk)}}, 0, np.inf)
    for k in range(nk):
        # t_s - sum path w - M z_k >= -M  (binding only for the chosen candidate)
        add({itl: 1.0, **{iwl + j * g + m: -pl[k, j, m + 1] for j in range(nl) for m in range(g)}, iz + k: -big_m},
            -big_m, np.inf)
        add({ith: 1.0, **{iwh + j * g + m: -ph[k, j, m + 1] for j in range(nh) for m in range(g)}, iz + k: -big_m},
            -big_m, np.inf)
    if coupled:
        add({itl: 1.0, ith: 1.0}, -np.inf, slo)

    norm = 4.0 * slo + 1.0  # t_L + t_H <= 2 SLO, so the third term stays below one GPU
    c = np.zeros(n_var)
    c[iz:iz + nk] = np.arange(nk) * (gpus + 2)
    c[iwl:iwl + nl * g] = workers[:nl * g]
    c[iwh:iwh + nh * g] = workers[:nh * g]
    c[itl] = c[ith] = 1.0 / norm
    res = milp(c, integrality=integrality, bounds=Bounds(lb, ub),
               constraints=rows.constraint(),
               options={"mip_rel_gap": 0.0, "presolve": True})
    if res.status != 0 or res.x is None:
        return None
    x = np.round(res.x[:iz + nk]).astype(int)
    k = int(np.argmax(x[iz:iz + nk]))

    def chosen(start, count, table):
        on = np.flatnonzero(x[start:start + count * g])
        if not len(on):
            return None, 0, 0.0
        j, m = divmod(int(on[0]), g)
        return j, m + 1, float(table[k, j, m + 1])

    jl, n_l, path_l = chosen(iwl, nl, pl)
    jh, n_h, path_h = chosen(iwh, nh, ph)
    return cands[k], jl, n_l, jh, n_h, path_l, path_h


def _queued_plan(cascade, gpus, demand, light, heavy, light_ok, heavy_ok, cand, mode, objective, lsel, hsel,
                 reason: str = "") -> Plan:
    """The plan of a solution: the stages at their batch sizes and worker counts, the predicted latency of
    a new query from the same path table the solvers used, and each stage's predicted delay in ``extra``."""

    def stage_plan(role, stage, ok, sel):
        j, n, path = sel
        if j is None or n == 0:
            return _stage_plan(cascade, role, stage, None, 0), 0.0
        return _stage_plan(cascade, role, stage, ok[j], n), path

    light_plan, path_l = stage_plan("light", light, light_ok, lsel)
    heavy_plan, path_h = stage_plan("heavy", heavy, heavy_ok, hsel)
    return _plan_of_paths(cascade, gpus, demand, light_plan, heavy_plan, path_l, path_h, cand, mode, objective,
                          not reason, reason,
                          extra={"stage_path_s": (path_l, path_h), "summed_path_s": path_l + path_h})


def _best_effort_queued(cascade, gpus, demand, light, heavy, mode, objective, q: _Queueing) -> Plan:
    """The little model's best-effort plan, except that a stage with a backlog keeps workers: the fewest
    that drain it within the SLO at its batch size of most throughput among those within the SLO (at least
    one, and one GPU left for the other stage). The fallback must not strand queued work either."""
    plan = _best_effort(cascade, gpus, demand, light, heavy, mode, objective, (q.batch_wait, (0.0, 0.0)))
    heavy_only = mode == "heavy-only"
    other_role = "light" if heavy_only else "heavy"
    other, backlog = (light, q.backlog[0]) if heavy_only else (heavy, q.backlog[1])
    if backlog <= 0 or gpus < 2 or not other.batch_sizes:
        return plan
    # The batch size of most throughput among those that finish within the SLO (a batch that takes longer
    # serves nobody in time), else the fastest.
    fits = [i for i, p in enumerate(other.path_s) if p <= cascade.slo_s]
    pool = fits or [min(range(len(other.path_s)), key=other.path_s.__getitem__)]
    i = max(pool, key=lambda i: (other.capacity[i], -other.batch_sizes[i]))
    b, lat = other.batch_sizes[i], other.latency_s[i]
    keep = min(gpus - 1, max(1, math.ceil(backlog * lat / (b * cascade.slo_s) - 1e-9)))
    model = cascade.light_model if other_role == "light" else cascade.heavy_model
    drain = StagePlan(other_role, model, keep, b, lat, keep * b / lat)
    main = plan.heavy if heavy_only else plan.light
    main = StagePlan(main.role, main.model, gpus - keep, main.batch_size, main.latency_s,
                     (gpus - keep) * main.batch_size / main.latency_s if main.latency_s else 0.0)
    stages = (drain, main) if heavy_only else (main, drain)
    reason = f"{plan.reason}; {keep} {other_role} worker(s) drain its backlog of {backlog:g}"
    return Plan(**{**plan.__dict__, "stages": stages, "reason": reason, "extra": {}})


def _allocate_pinned(cascade, gpus, demand, light, heavy, ranked, mode, objective, q: _Queueing,
                     workers: tuple[int, int]) -> Plan:
    """The best plan with each running stage at exactly ``workers`` (light, heavy) workers: the best-ranked
    candidate with an option pair that meets the SLO (with the backlog's drain) at those counts, then the
    least summed path, then the smallest light option, then heavy. A stage the candidate sends nothing
    and that holds no queued work is off (0 workers: a caller that keeps its workers spreads them back,
    :func:`diffsim.policies.spread_spare_gpus`); one that runs needs its count above 0.

    The same path tables as the solvers (:func:`_candidate_paths`), read at the pinned counts, so a split
    the unpinned solve chooses gives the plan it chose (``tests/test_allocator_queueing.py``). When nothing
    fits, the best-effort plan with ``feasible=False`` (no spread backlog here: the caller wants to know
    whether this split serves the demand within the SLO, and the unpinned solve handles the rest)."""
    nl, nh = workers
    slo = cascade.slo_s
    coupled = mode == "cascade"
    light_ok, heavy_ok = _queued_options(light, heavy, coupled, slo)
    found = None
    if 0 < nl + nh <= gpus:
        servable = _servable(ranked, demand, gpus, light, heavy, light_ok, heavy_ok)
        on_l_all = (ranked.light > 0) | q.keep[0] | coupled
        on_h_all = (ranked.heavy > 0) | q.keep[1]
        loads_l_all, loads_h_all = _queued_loads(ranked, slice(None), demand, q)

        def carries(stage, ok, loads, n, on):  # a running stage has n >= the fewest workers some option needs
            if not ok or n == 0:
                return ~on
            return ~on | (_queued_need(stage, ok, loads).min(axis=1) <= n)

        # Candidates the counts cannot carry even with no delay are skipped; the rest are read a few at a time
        # in rank order (1, 4, 16, ...: one table per stage for a group), stopping at the first that fits.
        ks_all = np.flatnonzero(servable & carries(light, light_ok, loads_l_all, nl, on_l_all)
                                & carries(heavy, heavy_ok, loads_h_all, nh, on_h_all))
        start, size = 0, 1
        while found is None and start < len(ks_all):
            ks = ks_all[start:start + size]
            start, size = start + size, size * 4
            found = _pinned_fit(ks, ranked, demand, light, heavy, light_ok, heavy_ok, q, coupled, slo, nl, nh,
                                on_l_all[ks], on_h_all[ks])
    if found is None:
        plan = _best_effort_queued(cascade, gpus, demand, light, heavy, mode, objective, q)
        return replace(plan, feasible=False, reason=f"no plan on {nl} light + {nh} heavy workers; {plan.reason}")
    cand, lsel, hsel = found
    return _queued_plan(cascade, gpus, demand, light, heavy, light_ok, heavy_ok, cand, mode, objective, lsel, hsel)


def _pinned_fit(ks, ranked, demand, light, heavy, light_ok, heavy_ok, q, coupled, slo, nl, nh, on_l, on_h):
    """The first of candidates ``ks`` (in rank order) with an option pair within the SLO at exactly ``nl`` and
    ``nh`` workers, as ``(candidate, light selection, heavy selection)``, or None (see :func:`_allocate_pinned`)."""
    rule_l, rule_h = q.path_rules(ranked.heavy[ks], coupled)
    loads_l, loads_h = _queued_loads(ranked, ks, demand, q)

    def at_count(stage, ok, loads, backlog, n, on, rule):
        # [k, option] path at exactly n workers (its table's running minimum from the fewest the rows need, as
        # the solvers' tables), then an "off" option: inf where the stage runs, 0 where it is off.
        if n > 0 and ok:
            first = min(n, int(_queued_need(stage, ok, loads).min()))
            table = _stage_paths(stage, ok, loads, backlog, q, slo, rule, first, n - first + 1)[:, :, -1]
        else:
            table = np.full((len(ks), len(ok)), np.inf)
        table = np.where(on[:, None], table, np.inf)
        return np.concatenate([table, np.where(on, np.inf, 0.0)[:, None]], axis=1)

    pl = at_count(light, light_ok, loads_l, q.backlog[0], nl, on_l, rule_l)
    ph = at_count(heavy, heavy_ok, loads_h, q.backlog[1], nh, on_h, rule_h)
    total = pl[:, :, None] + ph[:, None, :]
    fits = (pl <= slo)[:, :, None] & (ph <= slo)[:, None, :]
    if coupled:
        fits &= total <= slo
    some = fits.reshape(len(ks), -1).any(axis=1)
    if not some.any():
        return None
    i = int(np.argmax(some))  # the best-ranked candidate with a pair
    jl, jh = np.unravel_index(int(np.where(fits[i], total[i], np.inf).argmin()), fits[i].shape)
    lsel = (int(jl), nl, float(pl[i, jl])) if jl < len(light_ok) else (None, 0, 0.0)
    hsel = (int(jh), nh, float(ph[i, jh])) if jh < len(heavy_ok) else (None, 0, 0.0)
    return ranked.candidate(int(ks[i])), lsel, hsel
