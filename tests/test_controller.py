"""The controller: estimator fed every tick, re-plan schedule, Little's-law queue delays."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sim_helpers import FixedPolicy, ScriptedPolicy, a100_cascade, fixed_plan

from diffsim.config import ControllerConfig
from diffsim.errors import InputError
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
    # EWMA (pandas ewm(com=2.1): weights (1 - 1/3.1)^age) of 20, 40, 40
    w = [(1 - 1 / 3.1) ** age for age in (2, 1, 0)]
    assert inp.demand_qps == pytest.approx((20 * w[0] + 40 * w[1] + 40 * w[2]) / sum(w))
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


class DemandPolicy:
    """A pure policy whose plan follows the demand (more light workers, its demand on the plan); at zero
    demand it answers ``idle`` (e.g. a plan without workers). Counts its calls."""

    name = "demand"
    reads_peak_demand = True  # its plans carry the peak, so the idle fast path must get it right too

    def __init__(self, cascade, idle=None):
        self.cascade = cascade
        self.idle = idle
        self.calls = 0
        self.answers = []

    def plan(self, inp):
        from dataclasses import replace

        self.calls += 1
        if inp.demand_qps == 0 and self.idle is not None:
            return self.idle
        light = 1 + min(int(inp.demand_qps) // 4, 10)
        plan = replace(fixed_plan(self.cascade, light, 16 - light - 1, 4, 2, 0.2), demand_qps=inp.demand_qps,
                       predicted_latency_s=inp.queue_delay_s[0] + inp.queue_delay_s[1],
                       extra={"peak_demand_qps": inp.peak_demand_qps})
        self.answers.append(plan)
        return plan


BUSY = [(12, (3, 1), (12.0, 5.0)), (30, (9, 4), (30.0, 11.0)), (7, (0, 2), (7.0, 2.0))]


def test_the_policy_sees_the_peak_demand_of_the_stabilisation_window(cascade):
    """Each re-plan hands the policy the highest demand planned for over the last ``stabilization_s``
    (this one's included); older demands are forgotten; a resumed controller remembers what the one it
    was taken from did (a state from before the window: nothing); a window of 0 is the present demand."""
    policy = FixedPolicy(fixed_plan(cascade, 4, 12, 16, 4, 0.02))
    policy.reads_peak_demand = True
    cfg = ControllerConfig(tick_s=1.0, replan_s=1.0, ewma_window=1, headroom=1.0, initial_demand_qps=5.0,
                           stabilization_s=3.0)
    ctl = Controller(policy, 16, cfg)
    ctl.initial_plan(0.0)
    assert policy.inputs[-1].peak_demand_qps == 5.0
    seen = []
    for k, rate in enumerate([20, 8, 6, 4, 3, 9], start=1):
        ctl.on_tick(float(k), rate, (0, 0), (float(rate), 0.0))
        seen.append((policy.inputs[-1].demand_qps, policy.inputs[-1].peak_demand_qps))
    # the window holds the re-plans of the last 3 s: at t=4 the 20 of t=1 is gone
    assert seen == [(20, 20), (8, 20), (6, 20), (4, 8), (3, 6), (9, 9)]
    other = Controller(policy, 16, cfg)
    other.resume(ctl.state(6.0), 50.0)
    ctl.on_tick(7.0, 2, (0, 0), (2.0, 0.0))
    other.on_tick(51.0, 2, (0, 0), (2.0, 0.0))
    assert policy.inputs[-1] == policy.inputs[-2] and policy.inputs[-1].peak_demand_qps == 9
    old = {k: v for k, v in ctl.state(7.0).items() if k != "demands"}
    fresh = Controller(policy, 16, cfg)
    fresh.resume(old, 7.0)
    fresh.on_tick(8.0, 1, (0, 0), (1.0, 0.0))
    assert policy.inputs[-1].peak_demand_qps == 1
    none = Controller(policy, 16, replace(cfg, stabilization_s=0.0))
    none.initial_plan(0.0)
    none.on_tick(1.0, 20, (0, 0), (20.0, 0.0))
    none.on_tick(2.0, 8, (0, 0), (8.0, 0.0))
    assert policy.inputs[-1].peak_demand_qps == 8
    with pytest.raises(InputError, match="controller.stabilization_s"):
        ControllerConfig(stabilization_s=-1.0)
    # a policy that reads no window is handed none, and nothing is remembered for it (nor resumed)
    blind = FixedPolicy(fixed_plan(cascade, 4, 12, 16, 4, 0.02))
    ctl = Controller(blind, 16, cfg)
    ctl.initial_plan(0.0)
    ctl.on_tick(1.0, 20, (0, 0), (20.0, 0.0))
    assert [inp.peak_demand_qps for inp in blind.inputs] == [None, None] and ctl.state(1.0)["demands"] == []
    ctl.resume(other.state(51.0), 1.0)
    assert ctl.state(1.0)["demands"] == []


@pytest.mark.parametrize("offset", [1234.56789, 1e6 / 3])
@pytest.mark.parametrize("tick_s, replan_s, window_s", [(0.3, 0.9, 2.7), (0.3, 0.6, 6.0)])
def test_a_resumed_window_goes_on_as_the_one_it_was_taken_from(cascade, offset, tick_s, replan_s, window_s):
    """On another clock (a server's state taken up by a simulation: ``diffsim validate``), with fractional
    ticks and a window a whole number of re-plans long, the resumed controller hands the policy the same
    peaks: a demand a whole window old leaves the window on both clocks, however their times round."""
    import numpy as np

    cfg = ControllerConfig(tick_s=tick_s, replan_s=replan_s, ewma_window=3, stabilization_s=window_s)
    a_policy, b_policy = DemandPolicy(cascade), DemandPolicy(cascade)
    a = Controller(a_policy, 16, cfg)
    a.initial_plan(0.0)
    feed = [int(x) for x in np.random.default_rng(3).integers(0, 60, 200)]
    for k in range(1, 41):
        a.on_tick(k * tick_s, feed[k], (0, 0), (1.0, 0.0))
    b = Controller(b_policy, 16, cfg)
    b.resume(a.state(40 * tick_s), 40 * tick_s + offset)
    for k in range(41, 200):
        pa = a.on_tick(k * tick_s, feed[k], (0, 0), (1.0, 0.0))
        pb = b.on_tick(k * tick_s + offset, feed[k], (0, 0), (1.0, 0.0))
        assert pa == pb, k
    peaks = [p.extra["peak_demand_qps"] for p in b_policy.answers]  # each answer records its input's peak
    assert peaks == [p.extra["peak_demand_qps"] for p in a_policy.answers[-len(peaks):]]
    assert len(set(peaks)) > 5  # the window's peak moved: a window that always held one demand tests nothing


def test_read_state_checks_the_remembered_demands(cascade):
    from diffsim.runtime.controller import read_state

    policy = FixedPolicy(fixed_plan(cascade, 4, 12, 16, 4, 0.02))
    policy.reads_peak_demand = True
    ctl = Controller(policy, 16, ControllerConfig(tick_s=1.0, replan_s=1.0))
    ctl.initial_plan(0.0)
    state = ctl.state(0.5)
    assert read_state(state).demands == [(-0.5, 10.0 * 1.05)]
    for bad in ([[0.5, -1.0]], [[float("nan"), 1.0]], [[1.0, float("inf")]], [[1.0, 2.0], [2.0, 1.0]], [[1.0]]):
        with pytest.raises(ValueError, match="not a controller state"):
            read_state({**state, "demands": bad})


@pytest.mark.parametrize("tick_s, replan_s, window, idle_ticks", [
    (1.0, 5.0, 20, 400),
    (0.1, 0.25, 20, 1000),  # re-plan period not a whole number of ticks: the half-tick tolerance decides
    (0.7, 3.5, 5, 333),
    (1.0, 1.0, 1, 50),
    (0.5, 7.0, 40, 2000),
])
@pytest.mark.parametrize("demand", ["arrival", "in-system"])
@pytest.mark.parametrize("idle_plan", [False, True])
def test_idle_ticks_taken_at_once_equal_ticking_them_one_by_one(cascade, tick_s, replan_s, window, idle_ticks,
                                                                demand, idle_plan):
    """Two controllers see the same busy ticks, then idle ticks: one ticks through them, the other ticks
    only until it is idle-steady and takes the rest at once. Every demand row, re-plan and plan is the
    same, so is the state after (a busy tick then gives the same answer), and the policy is asked a
    number of times that does not grow with the idle stretch."""
    cfg = ControllerConfig(tick_s=tick_s, replan_s=replan_s, ewma_window=window, demand=demand)
    empty = fixed_plan(cascade, 0, 0, 1, 1) if idle_plan else None
    ticking, skipping = DemandPolicy(cascade, empty), DemandPolicy(cascade, empty)
    a, b = Controller(ticking, 16, cfg), Controller(skipping, 16, cfg)
    rows = {id(a): [], id(b): []}
    k = 0

    def tick(ctl, arrivals=0, queues=(0, 0), rates=(0.0, 0.0), in_system=0):
        plan = ctl.on_tick(k * tick_s, arrivals, queues, rates, 16, in_system=in_system)
        rows[id(ctl)].append((k * tick_s, ctl.rate_qps, ctl.demand_qps, plan))

    for ctl in (a, b):
        ctl.initial_plan(0.0)
    for arrivals, queues, rates in BUSY:
        k += 1
        for ctl in (a, b):
            tick(ctl, arrivals, queues, rates, in_system=sum(queues) + 3)
    assert not b.idle_steady()
    end = k + idle_ticks + round(cfg.stabilization_s / tick_s)  # the busy demands leave the window first
    while k < end and not b.idle_steady():
        k += 1
        tick(a)
        tick(b)
    assert b.idle_steady(), "never idle-steady"
    steady_at = k
    times = [j * tick_s for j in range(k + 1, end + 1)]
    for t in times:
        k += 1
        tick(a)
    assert a.idle_steady()
    replans = b.on_idle_ticks(times)
    rows[id(b)] += [(t, b.rate_qps, b.demand_qps, None) for t in times]
    for t, plan in replans:
        rows[id(b)][-len(times) + times.index(t)] = (t, b.rate_qps, b.demand_qps, plan)
    assert rows[id(a)] == rows[id(b)]
    # a plan's extra (here: the peak it was made with) is not part of its equality: compare it too
    assert [p.extra for *_, p in rows[id(a)] if p] == [p.extra for *_, p in rows[id(b)] if p]
    assert any(plan is not None for *_, plan in rows[id(a)][steady_at:]) == (not idle_plan)
    for attr in ("ticks", "last_plan_s", "plan", "queue_delay_s", "queue_lengths", "rate_qps", "demand_qps",
                 "_window_ticks", "_queue_sum", "_rate_sum", "_demands"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.estimator.estimate_qps == b.estimator.estimate_qps
    assert a.estimator.samples == b.estimator.samples
    calls = skipping.calls
    assert calls < ticking.calls
    for arrivals, queues, rates in reversed(BUSY):  # busy again: the same answers
        k += 1
        for ctl in (a, b):
            tick(ctl, arrivals, queues, rates, in_system=5)
        assert rows[id(a)][-1] == rows[id(b)][-1]
    # The policy calls up to steady do not depend on the idle stretch's length: a controller that took
    # ten times as many idle ticks at once asks exactly as often.
    assert calls == _calls_until_steady(cascade, cfg, empty)


def _calls_until_steady(cascade, cfg, empty) -> int:
    policy = DemandPolicy(cascade, empty)
    ctl = Controller(policy, 16, cfg)
    ctl.initial_plan(0.0)
    k = 0
    for arrivals, queues, rates in BUSY:
        k += 1
        ctl.on_tick(k * cfg.tick_s, arrivals, queues, rates, 16, in_system=sum(queues) + 3)
    while not ctl.idle_steady():
        k += 1
        ctl.on_tick(k * cfg.tick_s, 0, (0, 0), (0.0, 0.0), 16, in_system=0)
    ctl.on_idle_ticks([j * cfg.tick_s for j in range(k + 1, k + 10 * 2000)])
    return policy.calls


def test_idle_ticks_need_an_idle_steady_controller(cascade):
    ctl = Controller(DemandPolicy(cascade), 16, ControllerConfig())
    ctl.initial_plan(0.0)
    assert not ctl.idle_steady()  # no tick yet
    ctl.on_tick(1.0, 10, (0, 0), (10.0, 0.0), 16)
    assert not ctl.idle_steady()  # the estimate is not 0
    with pytest.raises(RuntimeError):
        ctl.on_idle_ticks([2.0])
