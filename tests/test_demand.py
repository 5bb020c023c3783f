"""The demand estimator: pandas-style adjusted EWMA over the last samples, times head-room."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsim.runtime.demand import DemandEstimator


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
