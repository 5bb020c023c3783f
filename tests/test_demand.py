"""The demand estimator: pandas-style adjusted EWMA over the last samples (arrival rates or in-system
counts), times head-room."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_helpers import FixedPolicy, a100_cascade, fixed_plan

from diffsim.config import ControllerConfig
from diffsim.errors import InputError
from diffsim.runtime.controller import Controller
from diffsim.runtime.demand import ARTIFACT_HEADROOM, DemandEstimator


def reference_ewm(samples, alpha):
    """pandas ``Series(samples).ewm(alpha=alpha, adjust=True).mean().iloc[-1]``, written out."""
    n = len(samples)
    weights = [(1 - alpha) ** (n - 1 - i) for i in range(n)]
    return sum(w * x for w, x in zip(weights, samples)) / sum(weights)


def test_first_sample_is_its_own_estimate():
    est = DemandEstimator()
    assert est.estimate_qps is None
    assert est.demand_qps(fallback_qps=10.0) == pytest.approx(10.5)
    assert est.update(20.0) == pytest.approx(20.0)
    assert est.demand_qps() == pytest.approx(21.0)


def test_matches_pandas_com_2_1():
    alpha = 1 / 3.1  # pandas com=2.1
    est = DemandEstimator(alpha=alpha, window=20, headroom=1.0)
    samples = [10, 12, 30, 5, 0, 7]
    for x in samples:
        est.update(x)
    assert est.estimate_qps == pytest.approx(reference_ewm(samples, alpha))
    # 30 after 10 and 12: the estimate moves towards it but not all the way.
    est2 = DemandEstimator(alpha=alpha, headroom=1.0)
    for x in (10, 10, 30):
        est2.update(x)
    assert 10 < est2.estimate_qps < 30


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1000), min_size=1, max_size=60), st.integers(1, 25))
def test_only_the_last_window_samples_count(samples, window):
    alpha = 1 / 3.1
    est = DemandEstimator(alpha=alpha, window=window, headroom=1.0)
    for x in samples:
        est.update(x)
    assert est.estimate_qps == pytest.approx(reference_ewm(samples[-window:], alpha), rel=1e-9, abs=1e-9)
    assert min(samples[-window:]) - 1e-9 <= est.estimate_qps <= max(samples[-window:]) + 1e-9


def test_constant_rate_is_estimated_exactly_and_headroom_applies():
    est = DemandEstimator(headroom=1.05)
    for _ in range(30):
        est.update(16.0)
    assert est.demand_qps() == pytest.approx(16.8)


def test_bad_arguments():
    with pytest.raises(ValueError):
        DemandEstimator(alpha=0)
    with pytest.raises(ValueError):
        DemandEstimator(window=0)
    with pytest.raises(ValueError):
        DemandEstimator().update(-1)


# pandas' ewm(com=2.1) has alpha = 1 / (1 + com) = 1 / 3.1, so a sample of age k weighs (1 - alpha)**k =
# (21/31)**k. The expected values below are that weighted mean written out with exact fractions (pandas
# itself is not installed here): adjust=True divides by the sum of the weights of the samples present.
R = Fraction(21, 31)


def test_in_system_estimate_is_pandas_ewm_com_2_1_of_the_counts_times_1_2():
    """The artifact's estimator: the EWMA of queries in the system, x 1.2, through the controller."""
    policy = FixedPolicy(fixed_plan(a100_cascade(), 4, 12, 16, 4, 0.02))
    ctl = Controller(policy, 16, ControllerConfig(demand="in-system", headroom=ARTIFACT_HEADROOM, replan_s=1.0))
    ctl.initial_plan(0.0)
    # arrivals per tick are ignored by this estimator: only the in-system counts 4, 10, 6 count
    for t, (arrivals, count) in enumerate([(50, 4), (0, 10), (7, 6)], start=1):
        ctl.on_tick(float(t), arrivals, (0, 0), (0.0, 0.0), in_system=count)
    # by hand, times 31^2 = 961 above and below: (6*961 + 10*21*31 + 4*441) / (961 + 21*31 + 441)
    # = (5766 + 6510 + 1764) / 2053 = 14040 / 2053 = 6.8388...
    expected = (6 + 10 * R + 4 * R**2) / (1 + R + R**2)
    assert expected == Fraction(14040, 2053)
    assert ctl.estimator.estimate_qps == pytest.approx(float(expected), rel=1e-12)
    assert ctl.demand_qps == pytest.approx(1.2 * 14040 / 2053, rel=1e-12)  # 8.2066...
    assert policy.inputs[-1].demand_qps == pytest.approx(1.2 * 14040 / 2053, rel=1e-12)


def test_in_system_estimate_keeps_the_last_20_samples():
    """After 21 ticks the first count has left the window: 20 samples of 5 after a 1000 estimate 5."""
    policy = FixedPolicy(fixed_plan(a100_cascade(), 4, 12, 16, 4, 0.02))
    ctl = Controller(policy, 16, ControllerConfig(demand="in-system", headroom=1.2))
    ctl.initial_plan(0.0)
    counts = [1000] + [5] * 19 + [2]
    for t, count in enumerate(counts, start=1):
        ctl.on_tick(float(t), 3, (0, 0), (3.0, 0.0), in_system=count)
    # 20 samples held: 1000 is gone; 2 (age 0) and 5 (ages 1..19)
    weights = [R**k for k in range(20)]
    expected = (2 * weights[0] + 5 * sum(weights[1:])) / sum(weights)
    assert ctl.estimator.estimate_qps == pytest.approx(float(expected), rel=1e-12)
    assert ctl.demand_qps == pytest.approx(1.2 * float(expected), rel=1e-12)


def test_arrival_estimate_ignores_the_in_system_count():
    policy = FixedPolicy(fixed_plan(a100_cascade(), 4, 12, 16, 4, 0.02))
    ctl = Controller(policy, 16, ControllerConfig(headroom=1.0))
    ctl.initial_plan(0.0)
    ctl.on_tick(1.0, 12, (0, 0), (12.0, 0.0), in_system=500)
    ctl.on_tick(2.0, 3, (0, 0), (3.0, 0.0), in_system=500)
    assert ctl.demand_qps == pytest.approx(float((3 + 12 * R) / (1 + R)), rel=1e-12)


def test_in_system_estimate_needs_the_count():
    ctl = Controller(FixedPolicy(fixed_plan(a100_cascade(), 1, 1, 1, 1)), 2, ControllerConfig(demand="in-system"))
    ctl.initial_plan(0.0)
    with pytest.raises(ValueError, match="in_system"):
        ctl.on_tick(1.0, 3, (0, 0), (3.0, 0.0))


def test_unknown_demand_kind_is_refused():
    with pytest.raises(InputError, match="demand"):
        ControllerConfig(demand="queued")


@given(st.lists(st.floats(0, 1e4), min_size=0, max_size=30), st.integers(0, 60), st.integers(1, 25))
@settings(max_examples=200, deadline=None)
def test_zeros_added_at_once_equal_zeros_added_one_by_one(samples, zeros, window):
    one, many = DemandEstimator(window=window), DemandEstimator(window=window)
    for x in samples:
        one.update(x)
        many.update(x)
    for _ in range(zeros):
        one.update(0)
    many.add_zeros(zeros)
    assert one.estimate_qps == many.estimate_qps
    assert one.samples == many.samples
    assert many.all_zero == (bool(one.samples) and all(x == 0 for x in list(one._samples)))
