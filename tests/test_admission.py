"""The admission rule: reject when now + queue wait + service > arrival + drop_factor x SLO."""

from __future__ import annotations

import math

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from diffsim.runtime.admission import StageLoad, batch_size_for_new, decide, queue_wait_s


def test_idle_stage_waits_nothing():
    assert queue_wait_s(StageLoad(workers=2, batch_size=4, queued=0, busy_remaining_s=0.0), 1.0) == 0.0


def test_wait_counts_full_rounds_ahead_and_the_running_batch():
    # 2 workers x batch 4 = 8 queries per round; 17 queued ahead = 2 full rounds, then the new one's round.
    load = StageLoad(workers=2, batch_size=4, queued=17, busy_remaining_s=0.25)
    assert queue_wait_s(load, 2.0) == 0.25 + 2 * 2.0


def test_stage_without_workers_never_serves():
    assert queue_wait_s(StageLoad(0, 4, 0, 0.0), 1.0) == math.inf
    d = decide(10.0, 10.0, math.inf, 0.1, slo_s=5.0, drop_factor=1.5)
    assert not d.accept and d.retry_after_s >= 1


def test_batch_size_for_new_query():
    assert batch_size_for_new(StageLoad(1, 4, 0, 0.0)) == 1
    assert batch_size_for_new(StageLoad(1, 4, 2, 0.0)) == 3
    assert batch_size_for_new(StageLoad(1, 4, 3, 0.0)) == 4
    assert batch_size_for_new(StageLoad(1, 4, 4, 0.0)) == 1  # next round
    assert batch_size_for_new(StageLoad(2, 4, 5, 0.0)) == 3


def test_decide_boundary_and_retry_after():
    # limit = 1.5 x 2 s = 3 s from arrival
    ok = decide(now=100.0, arrival_s=100.0, wait_s=2.0, service_s=1.0, slo_s=2.0, drop_factor=1.5)
    assert ok.accept and ok.retry_after_s == 0.0 and ok.deadline_s == 103.0
    late = decide(now=100.0, arrival_s=100.0, wait_s=4.2, service_s=1.0, slo_s=2.0, drop_factor=1.5)
    assert not late.accept
    assert late.predicted_completion_s == 105.2
    assert late.retry_after_s == 3.0  # ceil(2.2 s past the deadline)


@given(
    workers=st.integers(1, 8),
    batch=st.integers(1, 32),
    queued=st.integers(0, 500),
    more=st.one_of(st.integers(0, 40), st.integers(0, 500)),  # small: often within the same round
    busy=st.floats(0, 10),
    service=st.floats(0.001, 5),
)
def test_a_longer_queue_never_waits_less(workers, batch, queued, more, busy, service):
    shorter = queue_wait_s(StageLoad(workers, batch, queued, busy), service)
    longer = queue_wait_s(StageLoad(workers, batch, queued + more, busy), service)
    assert longer >= shorter >= busy
    rounds = (queued + more) // (workers * batch) - queued // (workers * batch)
    assert longer == pytest.approx(shorter + rounds * service)  # one batch time per full round more
    event("more queued: none" if more == 0 else f"more queued: {'same round' if rounds == 0 else 'more rounds'}")


@given(slo=st.floats(0.1, 30), factor=st.floats(1, 3), service=st.floats(0, 10),
       over=st.one_of(st.floats(-20, 20), st.just(0.0)))
def test_accepted_exactly_when_the_prediction_fits(slo, factor, service, over):
    """The predicted completion is drawn around the deadline (``over``: seconds past it; exactly on it
    too), so both decisions and the boundary are reached."""
    wait = max(0.0, factor * slo - service + over)
    d = decide(50.0, 50.0, wait, service, slo, factor)
    assert d.accept == (50.0 + wait + service <= 50.0 + factor * slo)
    assert (d.retry_after_s == 0.0) == d.accept
    if not d.accept:
        assert d.retry_after_s == max(1.0, math.ceil(d.predicted_completion_s - d.deadline_s))
    event("accepted" if d.accept else "refused")
    event(f"on the deadline: {over == 0.0 and wait > 0}")
