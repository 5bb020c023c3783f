"""The MILP policies' hysteresis with a plan-dependent delay (:meth:`diffsim.policies.MilpPolicy._keep_split`):
a re-plan keeps the worker split in force when the best plan on it is feasible and within the margin of the
new plan's FID, or when the new split could not carry the peak demand of the controller's stabilisation window,
and switches roles otherwise. Constructed inputs: the 8-GPU sdturbo-sdv15 plans of a busy
minute under ``--preset artifact --queue-model tail``, where alternate re-plans moved one GPU back and forth."""

from __future__ import annotations

from dataclasses import replace

import pytest

from diffsim.allocator import allocate
from diffsim.errors import DiffsimError
from diffsim.policies import SWITCH_MARGIN, PolicyInput, make_policy
from diffsim.profiles import load_cascade

SETTINGS = dict(queue_model="tail", routing="random", max_utilization=1.0)


@pytest.fixture(scope="module")
def turbo():
    return load_cascade("sdturbo-sdv15", "profiles/a100.yaml", "profiles/cascades.yaml")


def split(plan):
    return plan.light.workers, plan.heavy.workers


def in_force(turbo, light, heavy, demand=14.5, backlog=(0, 2)):
    """A plan in force on ``light`` + ``heavy`` workers, as the policy would have made it."""
    grid = make_policy("diffserve", turbo, **SETTINGS).grid
    plan = allocate(turbo, light + heavy, demand, backlog=backlog, thresholds=grid, workers=(light, heavy), **SETTINGS)
    assert plan.feasible and split(plan) == (light, heavy)
    return plan


def test_keeps_the_split_when_it_costs_less_than_the_margin(turbo):
    """At 14.5 qps the best plan moves a GPU from light to heavy (FID 18.77); the split in force, 2 + 6,
    still serves the demand within the SLO at FID 18.86, within 0.5%: no role switch. Without hysteresis
    the GPU moves."""
    current = in_force(turbo, 2, 6)
    inp = PolicyInput(14.5, (0.0, 0.0), 8, (0, 2), current)
    moved = make_policy("diffserve", turbo, switch_margin=0.0, **SETTINGS).plan(inp)
    assert split(moved) == (1, 7) and moved.feasible
    kept = make_policy("diffserve", turbo, **SETTINGS).plan(inp)
    assert split(kept) == (2, 6) and kept.feasible
    assert moved.expected_fid < kept.expected_fid <= moved.expected_fid * (1 + SWITCH_MARGIN)
    assert kept.extra["kept_split_over"][:2] == (1, 7)


def test_switches_when_the_split_in_force_costs_more_than_the_margin(turbo):
    """At 13.1 qps the best plan (1 + 7, FID 18.50) is more than 0.5% better than any on 2 + 6: it is taken."""
    current = in_force(turbo, 2, 6)
    plan = make_policy("diffserve", turbo, **SETTINGS).plan(PolicyInput(13.12, (0.0, 0.0), 8, (2, 0), current))
    assert split(plan) == (1, 7) and "kept_split_over" not in plan.extra
    kept = allocate(turbo, 8, 13.12, backlog=(2, 0), thresholds=make_policy("diffserve", turbo, **SETTINGS).grid,
                    workers=(2, 6), **SETTINGS)
    assert kept.feasible and kept.expected_fid > plan.expected_fid * (1 + SWITCH_MARGIN)


def test_switches_when_the_split_in_force_cannot_carry_the_demand(turbo):
    """One light worker (at most 18.6 qps) cannot carry 33.8 qps with 21 queued: however small the cost of
    switching, the plan moves GPUs to the light stage."""
    current = in_force(turbo, 1, 7)
    plan = make_policy("diffserve", turbo, switch_margin=0.5, **SETTINGS).plan(
        PolicyInput(33.79, (0.0, 0.0), 8, (21, 2), current))
    assert plan.feasible and plan.light.workers >= 2


def test_a_switch_must_carry_the_peak_of_the_stabilisation_window(turbo):
    """At 13.1 qps the best plan (1 + 7) is more than the margin better than any on 2 + 6 and is taken
    when the controller's window peaked at 20 qps (one light worker carries that). Had the window seen
    25 qps, which one light worker cannot carry, the split in force stays: the estimate that fell may
    come back. Without a window (or below its peak) the margin alone decides, as before."""
    current = in_force(turbo, 2, 6)
    policy = make_policy("diffserve", turbo, **SETTINGS)

    def plan(peak):
        return policy.plan(PolicyInput(13.12, (0.0, 0.0), 8, (2, 0), current, peak_demand_qps=peak))

    for peak in (None, 13.12, 20.0):
        moved = plan(peak)
        assert split(moved) == (1, 7) and "kept_split_over" not in moved.extra
    held = plan(25.0)
    assert split(held) == (2, 6) and held.feasible and held.extra["kept_split_over"][:2] == (1, 7)
    grid = policy.grid
    assert allocate(turbo, 8, 20.0, backlog=(2, 0), thresholds=grid, workers=(1, 7), **SETTINGS).feasible
    assert not allocate(turbo, 8, 25.0, backlog=(2, 0), thresholds=grid, workers=(1, 7), **SETTINGS).feasible
    # the window holds back even without a margin; the split in force must still carry the present demand
    assert split(make_policy("diffserve", turbo, switch_margin=0.0, **SETTINGS).plan(
        PolicyInput(13.12, (0.0, 0.0), 8, (2, 0), current, peak_demand_qps=25.0))) == (2, 6)
    short = in_force(turbo, 1, 7)
    assert make_policy("diffserve", turbo, **SETTINGS).plan(
        PolicyInput(33.79, (0.0, 0.0), 8, (21, 2), short, peak_demand_qps=60.0)).light.workers >= 2


def test_no_hysteresis_with_the_little_model(turbo):
    """The artifact's model keeps its plans (and diffsim's default outputs) as they were."""
    current = in_force(turbo, 2, 6)
    inp = PolicyInput(14.5, (0.0, 0.0), 8, (0, 2), current)
    plan = make_policy("diffserve", turbo, max_utilization=1.0, switch_margin=0.5).plan(inp)
    assert split(plan) == (1, 7)
    assert plan == make_policy("diffserve", turbo, max_utilization=1.0, switch_margin=0.0).plan(inp)
    assert plan == make_policy("diffserve", turbo, max_utilization=1.0).plan(replace(inp, peak_demand_qps=40.0))


def test_switch_margin_is_checked(turbo):
    with pytest.raises(DiffsimError, match="switch margin"):
        make_policy("diffserve", turbo, switch_margin=-0.1)


def test_plan_dependent_delay_plans_on_a_grid_of_small_deferral_steps():
    """With queue_model mean or tail the cascade policies choose among thresholds whose deferred fractions
    are about 1% apart: on the allocator's own grid (every 0.005) sdturbo-sdv15 defers 0% or 14.3% and
    nothing between, and tail-aware plans fell back to deferring nothing at peak load."""
    import numpy as np

    from diffsim.allocator import DEFAULT_THRESHOLDS
    from diffsim.config import build_sim_config
    from diffsim.policies import DEFERRAL_STEP, deferral_grid

    config = build_sim_config({})
    cascade = config.cascade
    assert cascade.deferral(0.005) == pytest.approx(0.143)  # the allocator grid's first step
    grid = deferral_grid(cascade)
    assert set(DEFAULT_THRESHOLDS) <= set(grid) and list(grid) == sorted(grid)
    steps = np.diff([cascade.deferral(t) for t in grid])
    assert steps.max() <= DEFERRAL_STEP + 1e-4 and steps.min() >= 0.0
    assert cascade.deferral(grid[1]) == pytest.approx(0.01, abs=1e-4)
    with pytest.raises(Exception, match="deferral step"):
        deferral_grid(cascade, 0.0)
    for model in ("mean", "tail"):
        assert make_policy("diffserve", cascade, queue_model=model).grid == grid
    # little (every policy's default), split mode (Proteus) and a pinned threshold keep their grids
    assert make_policy("diffserve", cascade).grid is None
    assert make_policy("proteus", cascade, queue_model="tail").grid is None
    assert make_policy("diffserve", cascade, queue_model="tail", thresholds=[0.05]).grid == (0.05,)
    # At 8 GPUs and 28 qps the tail-aware plan defers a little rather than nothing.
    policy = make_policy("diffserve", cascade, queue_model="tail", routing="random", max_utilization=1.0)
    plan = policy.plan(PolicyInput(demand_qps=28.0, queue_delay_s=(0.0, 0.0), gpus=8))
    coarse = make_policy("diffserve", cascade, queue_model="tail", routing="random", max_utilization=1.0,
                         thresholds=DEFAULT_THRESHOLDS).plan(PolicyInput(demand_qps=28.0, queue_delay_s=(0.0, 0.0), gpus=8))
    assert plan.feasible and coarse.feasible
    assert coarse.deferral_fraction == 0.0 < plan.deferral_fraction < 0.143


def _busiest_minute_switches(plans, gpus: int) -> int:
    """The most role switches (workers whose role changes, as the dispatcher assigns them) in any 60 s."""
    from diffsim.runtime.roles import assign_roles, switched

    roles, times = [None] * gpus, []
    for i, (t, plan) in enumerate(plans):
        new = assign_roles(roles, plan.light.workers, plan.heavy.workers)
        if i:
            times += [t] * len(switched(roles, new))
        roles = new
    return max((sum(s <= u < s + 60.0 for u in times) for s in times), default=0)


def test_the_stabilisation_window_ends_proteus_thrashing_on_a_step_trace():
    """Issue 13's target, at most 10 role switches in a minute with a plan-dependent delay: Proteus with
    the artifact's estimator on the paper-shaped step trace (`diffsim trace shape --builtin step --lo 10
    --hi 30 --intervals 360 --seed 4`) at 8 GPUs. Without the window its plans thrash: serving queries
    fast lowers the estimate (queries in the system) below the arrival rate, one light worker is planned,
    the queue builds, the estimate jumps and the GPUs move back."""

    from diffsim.config import build_sim_config
    from diffsim.simulator import simulate
    from diffsim.workload.trace_generators import builtin_shape, shape_trace

    trace = shape_trace(builtin_shape("step", 360), 10, 30, interval_s=1.0, seed=4)
    config = build_sim_config({"preset": "artifact", "queue_model": "tail", "policy": "proteus", "gpus": 8})
    assert config.controller.stabilization_s == 60.0
    with_window = simulate(config, trace)
    without = simulate(replace(config, controller=replace(config.controller, stabilization_s=0.0)), trace)
    assert _busiest_minute_switches(with_window.plans, 8) <= 10 < _busiest_minute_switches(without.plans, 8)
