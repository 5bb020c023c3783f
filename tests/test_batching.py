"""Batch formation from a FIFO queue, the drop rule, the batching timeout, service times."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from sim_helpers import a100_cascade

from diffsim.runtime.batching import (ServiceTimes, batch_ready, expired, finish_s, form_batch, late_deferred,
                                      service_time_s)
from diffsim.errors import DiffsimError
from diffsim.query import Query


def q(i, arrival):
    return Query(id=i, prompt_id=i, arrival_s=arrival, slo_s=5.0)


def test_service_time_from_profile():
    c = a100_cascade()
    assert service_time_s(c, "light", 1, False) == pytest.approx(0.100)
    assert service_time_s(c, "light", 16, True) == pytest.approx(0.770 + 0.020)
    assert service_time_s(c, "heavy", 4, False) == pytest.approx(3.680)
    assert service_time_s(c, "heavy", 3, False) == pytest.approx((2.160 + 3.680) / 2)  # interpolated
    with pytest.raises(DiffsimError):
        service_time_s(c, "light", 64, False)
    times = ServiceTimes(c)
    assert times("heavy", 4, False) == pytest.approx(3.680)


def test_cautious_times_widen_by_the_measured_spread():
    c = a100_cascade()
    times = ServiceTimes(c, alpha=0.5, beta=0.5, k=2.0)
    assert times.cautious("heavy", 4, False) == times("heavy", 4, False)  # nothing measured: the profile's
    times.observe("heavy", 4, False, 2 * 3.680)  # ratio 2: error 1 -> factor 1.5, deviation 0.5
    assert times.factor["heavy"] == pytest.approx(1.5) and times.deviation["heavy"] == pytest.approx(0.5)
    assert times("heavy", 4, False) == pytest.approx(1.5 * 3.680)
    assert times.cautious("heavy", 4, False) == pytest.approx((1.5 + 2 * 0.5) * 3.680)
    for _ in range(40):  # steady again at ratio 2: the factor converges and the spread fades
        times.observe("heavy", 4, False, 2 * 3.680)
    assert times.cautious("heavy", 4, False) == pytest.approx(2 * 3.680, rel=1e-6)
    assert times.cautious("light", 1, False) == pytest.approx(0.100)  # one estimate per stage


def test_an_estimate_carries_over_from_one_run_to_the_next():
    """state() of one estimator is where start_from() puts another: the same times, plain and cautious."""
    c = a100_cascade()
    first = ServiceTimes(c, alpha=0.5, beta=0.5)
    first.observe("heavy", 4, False, 2 * 3.680)  # factor 1.5, deviation 0.5
    first.observe("light", 1, False, 0.05)  # ratio 0.5: factor 0.75, deviation 0.25
    state = first.state()
    assert state == {"factor": {"light": 0.75, "heavy": 1.5}, "deviation": {"light": 0.25, "heavy": 0.5}}
    second = ServiceTimes(c, alpha=0.5, beta=0.5)
    second.start_from(state["factor"], state["deviation"])
    for role, n, disc in (("heavy", 4, False), ("light", 1, False), ("light", 8, True)):
        assert second(role, n, disc) == first(role, n, disc)
        assert second.cautious(role, n, disc) == first.cautious(role, n, disc)
    assert second.observed == {"light": 0, "heavy": 0}  # nothing measured in this run yet
    state["factor"]["heavy"] = 10.0  # a copy: the estimator's own state does not move with it
    assert first.factor["heavy"] == 1.5
    with pytest.raises(ValueError, match="heavy stage"):
        second.start_from({"heavy": 0.0}, {})
    with pytest.raises(ValueError, match="light stage"):
        second.start_from({}, {"light": -1.0})


def test_eager_takes_what_is_there_up_to_b():
    queue = deque(q(i, 0.0) for i in range(3))
    batch, dropped = form_batch(queue, 1.0, 8, lambda n: 0.1 * n, 7.5)
    assert [x.id for x in batch] == [0, 1, 2] and not dropped and not queue
    queue = deque(q(i, 0.0) for i in range(10))
    batch, dropped = form_batch(queue, 1.0, 4, lambda n: 0.1 * n, 7.5)
    assert [x.id for x in batch] == [0, 1, 2, 3] and [x.id for x in queue] == [4, 5, 6, 7, 8, 9]


def test_drop_rule_elapsed_plus_service_over_limit():
    # limit 7.5 s; batch of 2 takes 1.0 s. At now=7: query 0 (arrived 0) has 7 + 1 > 7.5 -> dropped;
    # query 1 (arrived 6.6): 0.4 + 1.0 <= 7.5 -> kept. Query 2 arrived 6.4: 0.6 + service(2) ok.
    queue = deque([q(0, 0.0), q(1, 6.6), q(2, 6.4)])
    batch, dropped = form_batch(queue, 7.0, 2, lambda n: 0.5 * n, 7.5)
    assert [x.id for x in dropped] == [0]
    assert [x.id for x in batch] == [1, 2]
    assert not queue


def test_drops_keep_going_until_batch_full():
    queue = deque([q(0, 0.0), q(1, 0.1), q(2, 9.0), q(3, 9.1), q(4, 9.2)])
    batch, dropped = form_batch(queue, 10.0, 2, lambda n: 1.0, 7.5)
    assert [x.id for x in dropped] == [0, 1]
    assert [x.id for x in batch] == [2, 3]
    assert [x.id for x in queue] == [4]


def test_batch_checked_against_size_it_would_have():
    # Service: 1 s for one, 3 s for two. limit 5. Query 0 waited 3 s: with a batch of 2 (3 + 3 > 5)
    # it is dropped; the remaining single query then runs alone.
    queue = deque([q(0, 0.0), q(1, 2.9)])
    batch, dropped = form_batch(queue, 3.0, 2, lambda n: {1: 1.0, 2: 3.0}[n], 5.0)
    assert [x.id for x in dropped] == [0] and [x.id for x in batch] == [1]


LIMIT_S = 7.5


@settings(max_examples=200, deadline=None)
@given(now=st.floats(0, 30), b=st.integers(1, 8),
       waits=st.one_of(st.lists(st.one_of(st.floats(0, 10), st.floats(6.3, 7.4)), max_size=30),
                       st.lists(st.floats(6.3, 10), max_size=12)))
def test_form_batch_properties(now, b, waits):
    """Queued queries waited 0-10 s, many of them where the drop depends on the batch's size (7.5 s limit
    minus a batch time of 0.3-1.0 s), or every one of them near or past the limit (a stale queue), so
    drops, full batches, batches that shrink and queues dropped whole are all common."""
    arrivals = sorted(now - w for w in waits)  # FIFO: the oldest first
    queue = deque(q(i, a) for i, a in enumerate(arrivals))
    service = lambda n: 0.2 + 0.1 * n  # noqa: E731
    batch, dropped = form_batch(queue, now, b, service, LIMIT_S)
    assert len(batch) <= b
    taken = batch + dropped
    # FIFO: batch, dropped and what remains partition the queue, in order.
    assert sorted(x.id for x in taken) == list(range(len(taken)))
    assert [x.id for x in queue] == list(range(len(taken), len(arrivals)))
    assert [x.id for x in batch] == sorted(x.id for x in batch)
    for x in batch:
        assert (now - x.arrival_s) + service(len(batch)) <= LIMIT_S + 1e-12
    largest = min(b, len(arrivals))  # the batch a drop is judged against is never larger than this
    for x in dropped:
        assert (now - x.arrival_s) + service(largest) > LIMIT_S - 1e-12
    assert len(batch) == b or not queue
    shrunk = any((now - x.arrival_s) + service(largest) > LIMIT_S for x in batch)
    event("queue: empty" if not arrivals else "drops: none" if not dropped else
          "drops: all taken" if not batch else "drops: some")
    event(f"batch full, queue left: {len(batch) == b and bool(queue)}")
    event(f"kept only because drops shrank the batch: {shrunk}")


def test_batch_ready_with_and_without_timeout():
    assert batch_ready(1, 0.0, 0.0, 8, 0.0) is None  # eager
    assert batch_ready(8, 0.0, 0.0, 8, 0.5) is None  # full
    assert batch_ready(3, 1.0, 1.2, 8, 0.5) == pytest.approx(1.5)  # wait for the oldest's timeout
    assert batch_ready(3, 1.0, 1.5, 8, 0.5) is None
    with pytest.raises(ValueError):
        batch_ready(0, 0.0, 0.0, 8, 0.5)


def test_expired():
    assert expired(q(0, 0.0), 7.0, 0.6, 7.5)
    assert not expired(q(0, 0.0), 6.8, 0.6, 7.5)


def deferred(i, arrival):
    query = q(i, arrival)
    query.deferred = True
    return query


HEAVY = {1: 1.0, 2: 1.5, 3: 2.0, 4: 2.5}.__getitem__  # batch times of n queries


def test_finish_counts_full_rounds_then_its_own_batch():
    # free at 10 s, batches of up to 2: positions 0 and 1 run in the first batch, 2 and 3 after it
    assert finish_s(10.0, 0, 1, 2, HEAVY) == 11.0  # alone: a batch of one
    assert finish_s(10.0, 1, 2, 2, HEAVY) == 11.5
    assert finish_s(10.0, 2, 3, 2, HEAVY) == 11.5 + 1.0  # one full batch, then a batch of one
    assert finish_s(10.0, 3, 5, 2, HEAVY) == 11.5 + 1.5
    assert finish_s(10.0, 4, 5, 2, HEAVY) == 11.5 * 2 - 10.0 + 1.0
    with pytest.raises(ValueError):
        finish_s(10.0, 2, 2, 2, HEAVY)


def test_late_deferred_takes_out_only_deferred_queries_past_their_deadline():
    """Deadline arrival + 5 s. Worker free at 3.0 s, batches of 2 (1.5 s for two): the first pair ends at
    4.5 s, the next at 6.0 s, the next 7.5 s."""
    a, b, c, e, f = deferred(0, 0.0), deferred(1, 0.0), deferred(2, 0.5), q(3, 0.0), deferred(4, 2.0)
    queue = deque([a, b, c, e, f])
    late = late_deferred(queue, 3.0, 2, HEAVY)
    # a, b end at 4.5 (in time); c would end at 6.0 > 5.5: late, out; e (not deferred) stays in its place and
    # moves up to the second batch, ending at 6.0 (a late heavy image, not this rule's); f then runs with it
    # (ending at 6.0 <= 7.0)
    assert late == [c]
    assert list(queue) == [a, b, e, f]


def test_late_deferred_counts_positions_after_removals():
    """A query that falls back no longer delays the queries behind it."""
    x, y, z = deferred(0, 0.0), deferred(1, 3.0), deferred(2, 3.0)
    queue = deque([x, y, z])
    # free at 4.5: x alone would end at 5.5 > 5.0 (late); without it, y and z run together and end at 6.0 <= 8.0
    assert late_deferred(queue, 4.5, 2, HEAVY) == [x]
    assert list(queue) == [y, z]


def test_late_deferred_adds_the_answer_time_and_leaves_a_queue_it_does_not_change():
    query = deferred(0, 0.0)
    queue = deque([query])
    assert late_deferred(queue, 3.9, 4, HEAVY) == [] and list(queue) == [query]  # ends at 4.9
    assert late_deferred(queue, 3.9, 4, HEAVY, answer_s=0.2) == [query] and not queue  # answered at 5.1
    assert late_deferred(deque(), 0.0, 4, HEAVY) == []


@settings(max_examples=200, deadline=None)
@given(free_at=st.floats(0.0, 10.0), b=st.integers(1, 4),
       arrivals=st.lists(st.tuples(st.floats(0.0, 10.0), st.booleans()), max_size=12))
def test_late_deferred_properties(free_at, b, arrivals):
    """Every kept deferred query is predicted on time among the kept ones; every query removed is deferred
    and was predicted late; order is kept."""
    queries = [deferred(i, t) if d else q(i, t) for i, (t, d) in enumerate(arrivals)]
    queue = deque(queries)
    late = late_deferred(queue, free_at, b, HEAVY)
    assert all(x.deferred for x in late)
    assert sorted(late + list(queue), key=lambda x: x.id) == queries
    kept = list(queue)
    for i, x in enumerate(kept):
        if x.deferred:
            assert finish_s(free_at, i, len(kept), b, HEAVY) <= x.deadline_s + 1e-9
    # each removed query was late where it stood when judged: behind the kept ones before it, ahead of
    # every query after it
    kept_ids, before = {x.id for x in kept}, 0
    for i, x in enumerate(queries):
        if x.id in kept_ids:
            before += 1
        else:
            assert finish_s(free_at, before, before + len(queries) - i, b, HEAVY) > x.deadline_s
    event(f"{len(late)} late")
