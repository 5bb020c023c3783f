"""The controller: estimator fed every tick, re-plan schedule, Little's-law queue delays."""

from __future__ import annotations

import pytest
from sim_helpers import FixedPolicy, ScriptedPolicy, a100_cascade, fixed_plan

from diffsim.config import ControllerConfig
from diffsim.runtime.controller import Controller, little_delay_s


@pytest.fixture(scope="module")
def cascade():
    return a100_cascade()


def test_little_delay():
    assert little_delay_s(10, 5.0) == pytest.approx(2.0)
    assert little_delay_s(10, 0.0) == 0.0
    assert little_delay_s(0, 3.0) == 0.0


def test_initial_plan_uses_initial_demand_times_headroom(cascade):
    policy = FixedPolicy(fixed_plan(cascade, 4, 12, 16, 4, 0.02))
    ctl = Controller(policy, 16, ControllerConfig(initial_demand_qps=20.0, headroom=1.05))
    plan = ctl.initial_plan(0.0)
    assert plan is policy._plan
    (inp,) = policy.inputs
    assert inp.demand_qps == pytest.approx(21.0)
    assert inp.queue_delay_s == (0.0, 0.0)
    assert inp.gpus == 16


def test_tick_before_initial_plan_is_an_error(cascade):
    ctl = Controller(FixedPolicy(fixed_plan(cascade, 1, 1, 1, 1)), 2)
    with pytest.raises(RuntimeError):
        ctl.on_tick(1.0, 0, (0, 0), (0.0, 0.0))


def test_replans_at_first_tick_then_every_period(cascade):
    policy = FixedPolicy(fixed_plan(cascade, 4, 12, 16, 4, 0.02))
    ctl = Controller(policy, 16, ControllerConfig(tick_s=1.0, replan_s=5.0))
    ctl.initial_plan(0.0)
    replans = [t for t in range(1, 23) if ctl.on_tick(float(t), 10, (0, 0), (10.0, 0.0)) is not None]
    assert replans == [1, 6, 11, 16, 21]
    assert len(policy.inputs) == 1 + len(replans)


def test_demand_follows_the_tick_rate_and_queue_delay_is_littles_law_over_the_period(cascade):
    policy = FixedPolicy(fixed_plan(cascade, 4, 12, 16, 4, 0.02))
    cfg = ControllerConfig(tick_s=0.5, replan_s=1.0, headroom=1.0)
    ctl = Controller(policy, 16, cfg)
    ctl.initial_plan(0.0)
    assert ctl.on_tick(0.5, 10, (6, 3), (20.0, 0.0)) is not None  # first tick re-plans
    assert ctl.rate_qps == pytest.approx(20.0)  # 10 arrivals in 0.5 s
    inp = policy.inputs[-1]
    assert inp.demand_qps == pytest.approx(20.0)
    assert inp.queue_delay_s == (pytest.approx(0.3), 0.0)  # 6 queued / 20 qps; heavy: no arrivals -> 0
    assert ctl.on_tick(1.0, 20, (0, 0), (40.0, 4.0)) is None
    assert ctl.on_tick(1.5, 20, (8, 2), (40.0, 4.0)) is not None
    inp = policy.inputs[-1]
    assert 20.0 < inp.demand_qps < 40.0  # EWMA of 20, 40, 40
    # Means over the two ticks since the last plan: light (0 + 8) / 2 queued at 40 qps, heavy 1 at 4 qps.
    assert inp.queue_delay_s == (pytest.approx(0.1), pytest.approx(0.25))
    assert ctl.queue_delay_s == inp.queue_delay_s


def test_a_plan_without_workers_is_not_applied(cascade):
    good = fixed_plan(cascade, 4, 12, 16, 4, 0.02)
    empty = fixed_plan(cascade, 0, 0, 1, 1)
    ctl = Controller(ScriptedPolicy([good, empty]), 16)
    ctl.initial_plan(0.0)
    assert ctl.on_tick(1.0, 5, (0, 0), (5.0, 0.0)) is None
    assert ctl.plan is good


def test_the_policy_sees_the_backlog_of_the_replan_tick_and_the_plan_in_force(cascade):
    """A plan-dependent delay model needs the queues a new plan inherits (the re-plan tick's own, not a
    mean over the period) and the plan in force (to keep spare workers where they are)."""
    first = fixed_plan(cascade, 4, 12, 16, 4, 0.02)
    policy = FixedPolicy(first)
    ctl = Controller(policy, 16, ControllerConfig(tick_s=1.0, replan_s=2.0))
    ctl.initial_plan(0.0)
    assert policy.inputs[0].queue_lengths == (0, 0) and policy.inputs[0].current is None
    ctl.on_tick(1.0, 10, (7, 3), (10.0, 2.0))  # first tick: re-plans
    assert policy.inputs[-1].queue_lengths == (7, 3)
    assert policy.inputs[-1].current is first
    assert ctl.on_tick(2.0, 10, (50, 40), (10.0, 2.0)) is None
    ctl.on_tick(3.0, 10, (2, 9), (10.0, 2.0))
    assert policy.inputs[-1].queue_lengths == (2, 9)
