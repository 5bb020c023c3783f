"""The dispatcher's light fallback: a deferred query whose heavy image could not be ready by its SLO
deadline is answered with its light image (at deferral, at heavy batch formation, at the deadline sweep,
and when a new plan moves it), counted completed, on time and served light; off by default."""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import a100_cascade, fixed_plan

from diffsim.query import Query
from diffsim.runtime.admission import predict
from diffsim.runtime.dispatcher import Dispatcher
from diffsim.runtime.routing import Router

# a100 sdturbo-sdv15: a light batch of 4 with the discriminator takes 0.24 s, a heavy batch of one 1.78 s.
LIGHT_4 = 0.22 + 0.02
HEAVY_1 = 1.78


def fell_back(queries) -> int:
    """How many of ``queries`` were answered with their light image by the fallback."""
    return sum(q.fell_back for q in queries)


def deferring(fallback: str, heavy_deviation: float = 0.0) -> tuple[Dispatcher, list[Query]]:
    """One light worker (batches of 4), one heavy worker (batches of 1); four queries arrive at 0 and their
    light batch ends at 0.24 s with every image below the threshold: all four are deferred. On the heavy
    worker they would end at 2.02, 3.80, 5.58 and 7.36 s: the last two past their 5 s deadline."""
    cascade = a100_cascade()
    d = Dispatcher(cascade, 2, router=Router("random", np.random.default_rng(0)), seed=0, fallback=fallback)
    d.apply_plan(fixed_plan(cascade, 1, 1, 4, 1, 0.5), 0.0, preloaded=True)
    d.service.start_from({"heavy": 1.0}, {"heavy": heavy_deviation})
    queries = [Query(i, i, 0.0, 5.0) for i in range(4)]
    for query in queries:
        d.admit(query, 0.0)
    batch, _ = d.take_batch(0, 0.0)
    assert batch is not None and len(batch.queries) == 4 and batch.service_s == pytest.approx(LIGHT_4)
    d.complete_batch(batch, LIGHT_4, [0.0] * 4)
    return d, queries


def test_a_deferred_query_the_heavy_worker_cannot_finish_in_time_gets_its_light_image_at_once():
    d, queries = deferring("light")
    assert list(d.queues[1]) == queries[:2]
    for query in queries[2:]:
        assert query.outcome == "completed" and query.served_by == "light" and query.deferred
        assert query.finished_s == pytest.approx(LIGHT_4) and not query.late and not query.violation
    assert fell_back(queries) == 2 and d.finished == 2
    assert d.queue_lengths() == (0, 2)


def test_the_fallback_promises_on_the_cautious_batch_time():
    """Measured heavy batch times that spread (a mean deviation of 0.2 of the profile's) widen the time a
    heavy image is promised on to 1.4 x 1.78 s: the second query would end at 0.24 + 2 x 2.49 = 5.22 s by
    it (3.80 s by the plain estimate) and is answered light as well."""
    d, queries = deferring("light", heavy_deviation=0.2)
    assert d.service("heavy", 1, False) == pytest.approx(HEAVY_1)
    assert list(d.queues[1]) == queries[:1] and fell_back(queries) == 3


def test_without_fallback_every_deferred_query_waits_for_the_heavy_model():
    d, queries = deferring("none")
    assert list(d.queues[1]) == queries and fell_back(queries) == 0 and d.finished == 0


def test_a_heavy_batch_leaves_out_a_query_it_would_finish_late_and_answers_it_light():
    """The first heavy batch runs slower than the profile (3.76 s): the estimate rises, and the second
    query, due at 5 s, would now end after it; it is answered light when the worker is free (4.0 s), not
    dropped, and no heavy batch is formed for it. Without the fallback it runs, and ends late."""
    for fallback in ("light", "none"):
        d, queries = deferring(fallback)
        first, _ = d.take_batch(1, LIGHT_4)
        assert first.queries == [queries[0]]
        d.complete_batch(first, 4.0, run_s=4.0 - LIGHT_4)
        assert queries[0].served_by == "heavy"
        estimate = d.service("heavy", 1, False)
        assert 4.0 + estimate > 5.0  # past the second query's deadline, within the drop limit (7.5 s)
        second, retry = d.take_batch(1, 4.0)
        if fallback == "light":
            assert second is None and retry is None
            assert queries[1].outcome == "completed" and queries[1].served_by == "light"
            assert queries[1].finished_s == 4.0 and not queries[1].late
            assert fell_back(queries) == 3 and d.finished == 4 and d.holding() == 0
        else:
            assert second.queries == [queries[1]]
            d.complete_batch(second, 4.0 + estimate)
            assert queries[1].served_by == "heavy" and queries[1].late


def test_the_deadline_sweep_answers_light_what_the_heavy_worker_can_no_longer_finish():
    """The heavy worker runs the first query until 2.02 s (by its estimate); at 3.5 s (still running: a
    slow batch) the second one could end at 3.5 + 1.78 = 5.28 s at the earliest: past its deadline."""
    d, queries = deferring("light")
    d.take_batch(1, LIGHT_4)
    assert d.expire_queued(3.0) == 0  # 3.0 + 1.78 = 4.78 s: still in time
    assert d.expire_queued(3.5) == 1
    assert queries[1].outcome == "completed" and queries[1].served_by == "light" and queries[1].finished_s == 3.5
    assert not d.queues[1] and fell_back(queries) == 3


def test_a_plan_without_heavy_workers_answers_the_queued_deferred_queries_light():
    d, queries = deferring("light")
    cascade = d.cascade
    d.apply_plan(fixed_plan(cascade, 2, 0, 4, 1, 0.5), 1.0)
    assert queries[0].served_by == "light" and queries[1].served_by == "light"
    assert queries[0].finished_s == 1.0 and fell_back(queries) == 4 and d.finished == 4
    assert not d.backlog["heavy"] and d.holding() == 0
    # and one deferred while the heavy stage has no worker is answered light at once
    late = Query(9, 9, 1.0, 5.0)
    d.admit(late, 1.0)
    batch, _ = d.take_batch(0, 1.0) if d.queues[0] else d.take_batch(1, 1.0)
    d.complete_batch(batch, 1.2, [0.0])
    assert late.served_by == "light" and late.finished_s == 1.2 and fell_back(queries + [late]) == 5


def test_queries_that_are_not_deferred_are_never_answered_light_by_the_fallback():
    """Split mode (Proteus): a query sent to the heavy stage has no light image; the fallback leaves it."""
    cascade = a100_cascade()
    d = Dispatcher(cascade, 1, router=Router("random", np.random.default_rng(0)), seed=0, fallback="light")
    d.apply_plan(fixed_plan(cascade, 0, 1, 1, 1, mode="split", light_share=0.0), 0.0, preloaded=True)
    queries = [Query(i, i, 0.0, 5.0) for i in range(4)]
    for query in queries:
        d.admit(query, 0.0)
    assert len(d.queues[0]) == 4 and fell_back(queries) == 0
    assert d.expire_queued(4.0) == 0 and len(d.queues[0]) == 4  # 4.0 + 1.78 is within the drop limit


def test_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="unknown fallback 'heavy'"):
        Dispatcher(a100_cascade(), 1, router=Router("random", np.random.default_rng(0)), fallback="heavy")


def test_admission_with_the_fallback_predicts_the_light_path_only():
    """A heavy queue of 40 (3.68 s batches of 4): without the fallback a new query that may be deferred is
    refused (its heavy image could not come in time); with it, its answer rests on the light path alone."""
    cascade = a100_cascade()
    for fallback, accept in (("none", False), ("light", True)):
        d = Dispatcher(cascade, 2, router=Router("least-loaded", np.random.default_rng(0)), seed=0, fallback=fallback)
        d.apply_plan(fixed_plan(cascade, 1, 1, 4, 4, 0.5), 0.0, preloaded=True)
        for i in range(40):
            d._place(Query(i, i, 0.0, 5.0), "heavy", 0.0)  # not deferred: queued whatever the fallback
        assert len(d.queues[1]) == 40
        assert predict(d, ["light"], 0.0, 5.0, 1.5).accept is accept


def test_a_lost_worker_s_deferred_queries_are_judged_where_they_are_put_back():
    """Two heavy workers, SLO 3.5 s (the second query's 6 s). The deferred query running on the lost worker
    goes back to the front of the other, whose own batch runs until 3.58 s: its heavy image could not come
    before 5.36 s, so it is answered light when the worker is lost (1.9 s), on time -- not at 3.58 s, late,
    when that worker frees."""
    cascade = a100_cascade()
    d = Dispatcher(cascade, 3, router=Router("least-loaded", np.random.default_rng(0)), seed=0, fallback="light")
    d.apply_plan(fixed_plan(cascade, 1, 2, 4, 1, 0.5), 0.0, preloaded=True)
    queries = [Query(i, i, 0.0, 6.0 if i == 1 else 3.5) for i in range(4)]
    for query in queries:
        d.admit(query, 0.0)
    light, _ = d.take_batch(0, 0.0)
    d.complete_batch(light, LIGHT_4, [0.0] * 4)
    assert fell_back(queries) == 2  # the third and fourth, second on a heavy worker, would end at 3.80 s
    lost = next(w for w in (1, 2) if d.queues[w] and d.queues[w][0] is queries[0])
    other = 3 - lost
    running, _ = d.take_batch(lost, LIGHT_4)
    assert running.queries == [queries[0]]
    held, _ = d.take_batch(other, 1.8)  # ends at 3.58 s
    assert held.queries == [queries[1]]
    d.remove_worker(lost, 1.9, running=running)
    assert queries[0].outcome == "completed" and queries[0].served_by == "light"
    assert queries[0].finished_s == 1.9 and not queries[0].late and fell_back(queries) == 3
    assert not d.queues[other]


@pytest.mark.parametrize("sampled", [False, True])
def test_the_fallback_counts_the_answer_overhead_drawn_or_not(sampled):
    """An answer takes 0.5 s beyond its batch (a constant, or drawn per answer with that median): with a
    4 s SLO the second deferred query's heavy image would reach its client at 3.80 + 0.5 = 4.30 s, late, so
    it is answered light at once either way."""
    from diffsim.runtime.service_time import LogNormalDraws

    overhead = LogNormalDraws(0.5, 0.2, np.random.default_rng(1)) if sampled else 0.5
    cascade = a100_cascade()
    d = Dispatcher(cascade, 2, router=Router("random", np.random.default_rng(0)), seed=0, fallback="light",
                   answer_overhead_s=overhead)
    d.apply_plan(fixed_plan(cascade, 1, 1, 4, 1, 0.5), 0.0, preloaded=True)
    queries = [Query(i, i, 0.0, 4.0) for i in range(2)]
    for query in queries:
        d.admit(query, 0.0)
    light, _ = d.take_batch(0, 0.0)
    d.complete_batch(light, LIGHT_4, [0.0] * 2)
    assert list(d.queues[1]) == queries[:1]
    assert queries[1].served_by == "light" and fell_back(queries) == 1
