"""Allocator invariants, checked over random profiles, demands and GPU counts (hypothesis), and both
solvers' optimum (MILP and exact) checked against a brute-force enumeration of every plan on small instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffsim.allocator import (DEFAULT_THRESHOLDS, MODES, _interpolate, _rank_candidates, _round_like_python,
                               allocate)
from diffsim.errors import DiffsimError
from diffsim.profiles import Cascade, DeferralCurve, FidCurve, LatencyTable, load_cascade

GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def latency_tables(draw, lo_ms: float, hi_ms: float):
    sizes = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4, unique=True).map(sorted))
    base = draw(st.floats(lo_ms, hi_ms))
    lat, cur = [], base
    for _ in sizes:
        lat.append(round(cur, 3))
        cur *= draw(st.floats(1.05, 2.2))  # larger batches take longer, usually sub-linearly
    return LatencyTable(batch_sizes=sizes, p50_ms=lat)


@st.composite
def cascades(draw):
    f = sorted(draw(st.lists(st.floats(0, 1), min_size=5, max_size=5)))
    f = [0.0] + [round(v, 4) for v in f]  # f(0) = 0: at threshold 0 nothing is deferred
    fid = [round(v, 3) for v in draw(st.lists(st.floats(10, 40), min_size=5, max_size=5))]
    return Cascade(
        name="random",
        slo_s=draw(st.floats(0.3, 8.0)),
        light_model="light",
        heavy_model="heavy",
        light=draw(latency_tables(10, 600)),
        heavy=draw(latency_tables(100, 4000)),
        discriminator=draw(latency_tables(1, 40)),
        deferral=DeferralCurve(t=list(GRID), f=f),
        fid=FidCurve(r=[0, 0.25, 0.5, 0.75, 1.0], fid=fid),
        fid_random=None,
        gpu="test",
    )


def _stage_options(cascade: Cascade, role: str, with_disc: bool, batch_sizes):
    table = cascade.light if role == "light" else cascade.heavy
    out = []
    for b in batch_sizes:
        ms = table.latency_ms(b)
        if ms is None:
            continue
        if with_disc:
            d = cascade.discriminator.latency_ms(b)
            if d is None:
                continue
            ms += d
        out.append((b, ms / 1e3, b / (ms / 1e3)))
    return out


def brute_force(cascade: Cascade, gpus: int, demand: float, queue=(0.0, 0.0), objective="quality",
                batch_sizes=(1, 2, 4, 8)):
    """Enumerate every (threshold, batch sizes, worker counts) plan; return the lexicographic best key."""
    ql, qh = queue
    best = None
    light_opts = _stage_options(cascade, "light", True, batch_sizes)
    heavy_opts = _stage_options(cascade, "heavy", False, batch_sizes)
    for t in GRID:
        f = cascade.deferral(t)
        primary = round(cascade.fid(1 - f), 9) if objective == "quality" else -t
        for bl, latl, capl in light_opts:
            if latl + ql > cascade.slo_s:
                continue
            for xl in range(1, gpus + 1):
                if capl * xl < demand - 1e-9:
                    continue
                heavy_choices = [(None, 0.0, 0.0, 0)] if f == 0 else [
                    (bh, lath, caph, xh) for bh, lath, caph in heavy_opts for xh in range(1, gpus + 1)]
                for bh, lath, caph, xh in heavy_choices:
                    if xl + xh > gpus:
                        continue
                    if f > 0 and caph * xh < demand * f - 1e-9:
                        continue
                    latency = latl + ql + (lath + qh if f > 0 else 0.0)
                    if latency > cascade.slo_s + 1e-12:
                        continue
                    key = (primary, xl + xh, round(latl + lath, 9))
                    if best is None or key < best:
                        best = key
    return best


def plan_key(plan, objective):
    primary = round(plan.expected_fid, 9) if objective == "quality" else -plan.threshold
    lat = plan.light.latency_s + (plan.heavy.latency_s if plan.heavy.workers else 0.0)
    return (primary, plan.gpus_used, round(lat, 9))


@pytest.mark.parametrize("solver", ["milp", "exact"])
@SETTINGS
@given(cascade=cascades(), gpus=st.integers(1, 6), load=st.floats(0, 0.6),
       objective=st.sampled_from(["quality", "max-threshold"]),
       ql=st.floats(0, 1), qh=st.floats(0, 1))
def test_solvers_match_brute_force(solver, cascade, gpus, load, objective, ql, qh):
    # Demand relative to what the GPUs could serve all light: most examples are feasible, and the
    # interesting ones (a heavy stage, a tight GPU count) are reached, not only "both infeasible".
    light_best = max((cap for _, _, cap in _stage_options(cascade, "light", True, (1, 2, 4, 8))), default=1.0)
    demand = load * max(gpus, 1) * light_best
    ql, qh = ql * cascade.slo_s / 4, qh * cascade.slo_s / 4  # waits that leave room for a batch
    plan = allocate(cascade, gpus, demand, queue_delay_s=(ql, qh), batch_sizes=(1, 2, 4, 8),
                    thresholds=GRID, objective=objective, solver=solver)
    best = brute_force(cascade, gpus, demand, (ql, qh), objective)
    event("feasible" if best is not None else "infeasible")
    if best is not None:
        event("defers to the heavy stage" if plan.heavy.workers else "all light")
    assert plan.feasible == (best is not None)
    if best is not None:
        key = plan_key(plan, objective)
        assert key[0] == pytest.approx(best[0], abs=1e-9)
        assert key[1] == best[1]
        assert key[2] == pytest.approx(best[2], abs=1e-9)


@SETTINGS
@given(cascade=cascades(), gpus=st.integers(0, 40), demand=st.floats(0, 200),
       objective=st.sampled_from(["quality", "max-threshold"]),
       mode=st.sampled_from(["cascade", "split", "light-only", "heavy-only"]),
       ql=st.floats(0, 1), qh=st.floats(0, 1))
def test_plan_invariants(cascade, gpus, demand, objective, mode, ql, qh):
    plan = allocate(cascade, gpus, demand, queue_delay_s=(ql, qh), thresholds=GRID, objective=objective, mode=mode)
    assert plan.gpus_used <= gpus
    assert all(s.workers >= 0 for s in plan.stages)
    assert plan.light.role == "light" and plan.heavy.role == "heavy"
    if not plan.feasible:
        assert plan.reason
        # best effort: one stage on every GPU, at the profiled batch size of most throughput
        stage = plan.heavy if mode == "heavy-only" else plan.light
        options = _stage_options(cascade, stage.role, mode == "cascade", (1, 2, 4, 8, 16, 32))
        assert stage.workers == (gpus if options else 0)
        if gpus and options:
            assert stage.capacity_qps / gpus == pytest.approx(max(cap for _, _, cap in options))
        return
    assert not plan.reason
    light_load = demand * (1.0 if plan.mode == "cascade" else plan.light_share)
    heavy_load = demand * plan.deferral_fraction
    assert plan.light.capacity_qps >= light_load - 1e-6
    assert plan.heavy.capacity_qps >= heavy_load - 1e-6
    assert plan.predicted_latency_s <= cascade.slo_s + 1e-9
    for s in plan.stages:
        if s.workers:
            assert s.capacity_qps == pytest.approx(s.workers * s.batch_size / s.latency_s)
    if plan.mode == "cascade":
        assert plan.deferral_fraction == pytest.approx(cascade.deferral(plan.threshold))
        assert plan.expected_fid == pytest.approx(cascade.fid(1 - plan.deferral_fraction))
        assert plan.light.workers >= 1
        # latency = light path (+ heavy path when something is deferred)
        expect = plan.light.latency_s + ql + ((plan.heavy.latency_s + qh) if plan.deferral_fraction > 0 else 0)
        assert plan.predicted_latency_s == pytest.approx(expect)
    if mode == "light-only":
        assert plan.heavy.workers == 0 and plan.light_share == 1.0
    if mode == "heavy-only":
        assert plan.light.workers == 0 and plan.light_share == 0.0


def _objective(plan, objective):
    return plan.expected_fid if objective == "quality" else -plan.threshold


@SETTINGS
@given(cascade=cascades(), gpus=st.integers(1, 30), extra=st.integers(1, 10), demand=st.floats(0, 100),
       less=st.floats(0, 1), objective=st.sampled_from(["quality", "max-threshold"]))
def test_more_gpus_or_less_demand_never_worse(cascade, gpus, extra, demand, less, objective):
    base = allocate(cascade, gpus, demand, thresholds=GRID, objective=objective)
    assume(base.feasible)
    more = allocate(cascade, gpus + extra, demand, thresholds=GRID, objective=objective)
    lower = allocate(cascade, gpus, demand * less, thresholds=GRID, objective=objective)
    for other in (more, lower):
        assert other.feasible
        assert _objective(other, objective) <= _objective(base, objective) + 1e-9


@SETTINGS
@given(cascade=cascades(), gpus=st.integers(0, 20), demand=st.floats(0, 60),
       mode=st.sampled_from(["cascade", "split"]))
def test_same_input_same_plan(cascade, gpus, demand, mode):
    a = allocate(cascade, gpus, demand, thresholds=GRID, mode=mode)
    b = allocate(cascade, gpus, demand, thresholds=GRID, mode=mode)
    assert a == b  # solve_ms is excluded from equality


# ---------------------------------------------------------------------------------------------
# The shipped A100 profile


@pytest.fixture(scope="module")
def turbo():
    return load_cascade("sdturbo-sdv15", "profiles/a100.yaml", "profiles/cascades.yaml")


@pytest.mark.parametrize("name", ["sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl"])
@pytest.mark.parametrize("objective", ["quality", "max-threshold"])
def test_shipped_cascades_answer(name, objective):
    cascade = load_cascade(name, "profiles/a100.yaml", "profiles/cascades.yaml")
    plan = allocate(cascade, 16, 10.0, objective=objective)
    assert plan.feasible
    assert plan.gpus_used <= 16
    assert plan.predicted_latency_s <= cascade.slo_s


def test_quality_objective_is_not_max_threshold(turbo):
    """The FID curve is U-shaped: at low load the best mix defers ~60%, not everything."""
    q = allocate(turbo, 16, 4.0, objective="quality")
    m = allocate(turbo, 16, 4.0, objective="max-threshold")
    assert m.threshold == 1.0 and m.deferral_fraction == 1.0
    assert 0.3 < 1 - q.deferral_fraction < 0.5  # light-served fraction near the FID minimum (r ~ 0.4)
    assert q.expected_fid < m.expected_fid


def test_infeasible_returns_best_effort(turbo):
    plan = allocate(turbo, 2, 500.0)
    assert not plan.feasible
    assert "exceeds" in plan.reason
    assert plan.threshold == 0.0 and plan.heavy.workers == 0
    assert plan.light.workers == 2
    # most throughput among the profiled batch sizes: 16 and 32 tie at 20.25 qps per worker
    # (0.77 + 0.02 s and 1.56 + 0.02 s); the tie goes to the smaller batch, which has the lower latency
    assert plan.light.batch_size == 16


@pytest.mark.parametrize("solver", ["exact", "milp"])
@pytest.mark.parametrize("queue_s", [4.85, 6.0])
def test_best_effort_keeps_the_most_throughput(turbo, solver, queue_s):
    """Queueing past the SLO for every batch size (6 s), or for all but batch 1 (4.85 s): the fallback
    still runs the batch of most throughput (16: 20.25 qps a GPU), not the fastest one (1: 8.33 qps)."""
    plan = allocate(turbo, 4, 200.0, queue_delay_s=(queue_s, queue_s), solver=solver)
    assert not plan.feasible
    assert plan.light.workers == 4 and plan.light.batch_size == 16
    assert plan.light.capacity_qps == pytest.approx(4 * 16 / 0.79)
    assert ("meets the 5 s SLO" in plan.reason) == (queue_s == 6.0)
    if queue_s == 4.85:  # capacity within the SLO is batch 1's
        assert plan.reason.startswith("demand 200.00 qps exceeds") and "at batch 1" in plan.reason


def test_no_gpus(turbo):
    plan = allocate(turbo, 0, 1.0)
    assert not plan.feasible and plan.gpus_used == 0 and "no GPUs" in plan.reason


def test_single_model_plans_from_the_same_code(turbo):
    light = allocate(turbo, 16, 10.0, mode="light-only", batch_sizes=[1])
    assert light.feasible and light.heavy.workers == 0 and light.light.batch_size == 1
    assert light.expected_fid == pytest.approx(turbo.fid(1.0))
    heavy = allocate(turbo, 16, 5.0, mode="heavy-only", batch_sizes=[1])
    assert heavy.feasible and heavy.light.workers == 0 and heavy.heavy.batch_size == 1
    assert heavy.expected_fid == pytest.approx(turbo.fid(0.0))


def test_queue_delay_tightens_latency(turbo):
    free = allocate(turbo, 16, 20.0)
    tight = allocate(turbo, 16, 20.0, queue_delay_s=(1.0, 1.0))
    assert tight.predicted_latency_s <= turbo.slo_s
    assert tight.heavy.batch_size <= free.heavy.batch_size


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gpus=-1, demand_qps=1.0),
        dict(gpus=4, demand_qps=math.nan),
        dict(gpus=4, demand_qps=-1.0),
        dict(gpus=4, demand_qps=1.0, objective="fastest"),
        dict(gpus=4, demand_qps=1.0, mode="all"),
        dict(gpus=4, demand_qps=1.0, batch_sizes=[0]),
        dict(gpus=4, demand_qps=1.0, thresholds=[1.5]),
        dict(gpus=4, demand_qps=1.0, queue_delay_s=(-1.0, 0.0)),
    ],
)
def test_bad_inputs_raise_clear_errors(turbo, kwargs):
    with pytest.raises(DiffsimError):
        allocate(turbo, **kwargs)


@SETTINGS
@given(cascade=cascades(), gpus=st.integers(1, 30), demand=st.floats(0, 100), rho=st.floats(0.3, 1.0),
       wait=st.floats(0, 1), ql=st.floats(0, 1), qh=st.floats(0, 1))
def test_utilization_cap_and_batch_wait_hold(cascade, gpus, demand, rho, wait, ql, qh):
    plan = allocate(cascade, gpus, demand, queue_delay_s=(ql, qh), thresholds=GRID, max_utilization=rho,
                    batch_wait=wait)
    assume(plan.feasible)
    assert plan.light.capacity_qps * rho >= demand - 1e-6
    assert plan.heavy.capacity_qps * rho >= demand * plan.deferral_fraction - 1e-6
    heavy = (plan.heavy.latency_s * (1 + wait) + qh) if plan.deferral_fraction > 0 else 0.0
    expect = plan.light.latency_s * (1 + wait) + ql + heavy
    assert plan.predicted_latency_s == pytest.approx(expect)
    assert plan.predicted_latency_s <= cascade.slo_s + 1e-9
    # a looser cap never makes the objective worse
    loose = allocate(cascade, gpus, demand, queue_delay_s=(ql, qh), thresholds=GRID, batch_wait=wait)
    assert loose.feasible and loose.expected_fid <= plan.expected_fid + 1e-9


# ----------------------------------------------------------------------------------------------
# The candidates' ranking in numpy (a cold solve's main cost) against the one-threshold-at-a-time loop


def _ranking_by_loop(cascade: Cascade, grid, objective: str, mode: str) -> list[tuple]:
    """The ranking as the allocator computed it before it was vectorised: each threshold through the curves'
    ``__call__`` and ``round``, merged in a dict, sorted, then the frontier by pairwise comparison."""
    if mode == "cascade":
        raw = [(t, cascade.deferral(t), 1.0, cascade.fid(1.0 - cascade.deferral(t))) for t in grid]
    else:
        shares = {"split": grid, "light-only": (0.0,), "heavy-only": (1.0,)}[mode]
        raw = [(p, p, 1.0 - p, cascade.random_mix_fid(1.0 - p)) for p in shares]
    merged: dict[float, tuple] = {}
    for key, h, l, fid in sorted(raw):
        h = round(h, 12)
        if h not in merged or objective == "max-threshold":
            merged[h] = (key, h, l, fid)
    cands = list(merged.values())
    if objective == "quality":
        cands.sort(key=lambda c: (round(c[3], 9), c[1], c[0]))
    else:
        cands.sort(key=lambda c: -c[0])
    frontier: list[tuple] = []
    for c in cands:
        if all(c[1] < f[1] or c[2] < f[2] for f in frontier):
            frontier.append(c)
    return frontier


# Values that land on (or within an ulp of) a half at 9 and 12 digits, where rounding is hardest.
_HALVES = st.builds(lambda k, d, step: float(np.nextafter((k + 0.5) / 10 ** d, step)),
                    st.integers(0, 10 ** 6), st.sampled_from([9, 12]), st.sampled_from([-np.inf, 0.0, np.inf]))


@st.composite
def ranking_inputs(draw):
    knots = draw(st.lists(st.floats(0, 1).map(lambda v: round(v, 3)), max_size=8, unique=True))
    t = sorted({0.0, 1.0, *knots})
    # Deferral with flat stretches (equal heavy fractions to merge) and values at awkward halves.
    f = sorted(draw(st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 1), _HALVES),
                             min_size=len(t), max_size=len(t))))
    f = [min(v, 1.0) for v in f]
    r = sorted({0.0, 1.0, *draw(st.lists(st.floats(0, 1), max_size=5))})
    values = st.one_of(st.floats(5, 60), st.floats(5, 60).map(lambda v: round(v, 2)), _HALVES.map(lambda v: 10 + v))
    fid = draw(st.lists(values, min_size=len(r), max_size=len(r)))
    fid_random = None
    if draw(st.booleans()):
        fid_random = FidCurve(r=r, fid=draw(st.lists(values, min_size=len(r), max_size=len(r))))
    cascade = Cascade(
        name="random", slo_s=1.0, light_model="light", heavy_model="heavy",
        light=LatencyTable(batch_sizes=[1], p50_ms=[10.0]), heavy=LatencyTable(batch_sizes=[1], p50_ms=[100.0]),
        discriminator=LatencyTable(batch_sizes=[1], p50_ms=[1.0]),
        deferral=DeferralCurve(t=t, f=f), fid=FidCurve(r=r, fid=fid), fid_random=fid_random, gpu="test")
    grid = draw(st.one_of(
        st.just(DEFAULT_THRESHOLDS),
        st.lists(st.one_of(st.sampled_from(t), st.floats(0, 1), st.floats(0, 1).map(lambda v: round(v, 2))),
                 min_size=1, max_size=60).map(tuple)))  # knots, duplicates, anything between
    return cascade, grid, draw(st.sampled_from(["quality", "max-threshold"])), draw(st.sampled_from(list(MODES)))


@settings(max_examples=300, deadline=None)
@given(ranking_inputs())
def test_vectorised_ranking_equals_the_python_loop(inputs):
    cascade, grid, objective, mode = inputs
    ranked = _rank_candidates(cascade, grid, objective, mode)
    expect = _ranking_by_loop(cascade, grid, objective, mode)
    assert [(c.key, c.heavy_fraction, c.light_fraction, c.fid) for c in ranked.cands] == expect
    assert [ranked.candidate(k) for k in range(len(expect))] == list(ranked.cands)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.floats(allow_nan=False), _HALVES, _HALVES.map(lambda v: -v),
                          _HALVES.map(lambda v: v * 2 ** 30)), min_size=1, max_size=20),
       st.sampled_from([9, 12]))
def test_round_like_python_is_round(values, digits):
    got = _round_like_python(np.array(values), digits).tolist()
    expect = [round(v, digits) for v in values]
    assert [v.hex() for v in got] == [v.hex() for v in expect]  # bit for bit, signed zeros included


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=6, unique=True),
       st.lists(st.floats(0, 100), min_size=8, max_size=8), st.lists(st.floats(-0.1, 1.1), max_size=30))
def test_interpolate_is_the_curves_call(knots, ys, xs):
    x = sorted({0.0, 1.0, *knots})
    curve = FidCurve(r=x, fid=ys[:len(x)] + [1.0] * (len(x) - len(ys[:len(x)]))).curve
    xs = xs + x  # the knots themselves, where a curve switches segments
    got = _interpolate(curve, np.array(xs)).tolist()
    assert [v.hex() for v in got] == [float(curve(v)).hex() for v in xs]
