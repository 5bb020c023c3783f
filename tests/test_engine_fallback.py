"""The engine with the light fallback (``fallback: light``): a deferred query whose heavy image could not be
ready by its deadline is answered with the light image its light batch made, counted completed and served
light; the same rule the simulator runs (diffsim.runtime.dispatcher). Fake workers on virtual time, a gate
instead of any timing."""

from __future__ import annotations

import asyncio

import pytest
from test_engine import FAST_CONTROLLER, FakeWorker, GatedWorker, fake_cascade, run, static

from diffsim.server.engine import Engine, EngineConfig
from virtual_time import loop_time, wait_until


def engine_with_a_held_heavy_worker(fallback: str):
    """SLO 0.3 s; one light worker (batches of 4, 10 ms), one heavy worker (batches of 1, 60 ms by the
    profile) whose batches wait at a gate; every image is deferred (threshold 1)."""
    gate = asyncio.Event()
    workers = [FakeWorker(0), GatedWorker(1, gate)]
    config = EngineConfig(cascade=fake_cascade(slo_s=0.3), gpus=2, policy="static", controller=FAST_CONTROLLER,
                          static_plan=static(1.0, 1, 1, lb=4, hb=1), batch_sizes=(1, 2, 4), fallback=fallback)
    return Engine(config, workers, clock=loop_time), gate, workers


def test_a_deferred_query_the_heavy_worker_would_finish_late_gets_its_light_image():
    """Six queries at 0: the first light batch (four) ends at 0.01 s and defers them to the heavy worker,
    which holds the first at its gate; by the profile they would end at 0.07-0.25 s, in time. The second
    light batch (two) ends at 0.02 s: behind the held batch and the three queued, each would end at
    0.07 + 4 x 0.06 = 0.31 s, past its 0.3 s deadline, so both are answered at once with their light images
    (before any deadline sweep, at 0.1 s). Then the gate opens and the first four get their heavy images."""

    async def scenario():
        from diffsim.server.prometheus import ServerMetrics

        engine, gate, workers = engine_with_a_held_heavy_worker("light")
        metrics = ServerMetrics(engine)
        await engine.start()
        pending = asyncio.ensure_future(engine.generate([f"p{i}" for i in range(6)], [0] * 6))
        await wait_until(lambda: engine.fallback_light == 2, "the two late deferred queries are answered")
        now = engine.now
        held = workers[1].waiting
        gate.set()
        answers = await pending
        snapshot = engine.snapshot()
        assert snapshot["fallback"] == "light"  # what diffsim load reads (its summary's FID bound)
        assert snapshot["fallback_light"] == 2
        assert "diffsim_fallback_light_total 2.0" in metrics.render().decode()
        await engine.stop()
        return engine, answers, now, held

    engine, answers, answered_at, held = run(scenario())
    assert answered_at < 0.1 and held == 1  # answered at their deferral, the heavy batch still held
    for a in answers[:4]:
        assert a.query.served_by == "heavy" and a.model == "sd-v1.5" and a.png == f"heavy:{a.query.prompt}".encode()
    for a in answers[4:]:
        q = a.query
        assert q.outcome == "completed" and q.deferred and q.served_by == "light"
        assert a.model == "sd-turbo" and a.png == f"light:{q.prompt}".encode()  # the kept light image
        assert q.stages == ["light"] and q.finished_s == pytest.approx(0.02) and not q.late
    assert engine.fallback_light == 2 and engine.outcomes["completed"] == 6 and engine.violations == 0
    assert engine.describe()["run"]["fallback"] == "light"  # what diffsim validate reads of the run


def test_without_the_fallback_the_same_queries_wait_for_the_heavy_model():
    async def scenario():
        engine, gate, workers = engine_with_a_held_heavy_worker("none")
        await engine.start()
        pending = asyncio.ensure_future(engine.generate([f"p{i}" for i in range(6)], [0] * 6))
        await wait_until(lambda: len(engine.dispatcher.queues[1]) == 5, "five deferred queries queue for heavy")
        fallbacks = engine.fallback_light
        gate.set()
        answers = await pending
        await engine.stop()
        return engine, answers, fallbacks

    engine, answers, fallbacks = run(scenario())
    assert fallbacks == 0 and engine.fallback_light == 0
    # the gate opens at once, and the batches (no time on the fake worker) finish every one in time
    assert [a.query.served_by for a in answers] == ["heavy"] * 6 and [a.model for a in answers] == ["sd-v1.5"] * 6


def test_a_failed_heavy_batch_answers_its_deferred_queries_light_with_the_fallback():
    """The heavy worker's executor raises: with the light fallback its deferred queries get the light images
    their light batch made (completed, on time, not failed); without it they fail, as any failed batch's."""
    from test_engine import FakeWorker, make_engine

    def scenario(fallback):
        async def go():
            heavy_fails = lambda job: job.role == "heavy"  # noqa: E731
            workers = [FakeWorker(0), FakeWorker(1, fail=heavy_fails)]
            engine = make_engine(plan=static(1.0, 1, 1, lb=4, hb=4), workers=workers, gpus=2, fallback=fallback)
            await engine.start()
            answers = await engine.generate(["a", "b"], [1, 2])
            await engine.stop()
            return engine, answers
        return run(go())

    engine, answers = scenario("light")
    for a in answers:
        q = a.query
        assert q.outcome == "completed" and q.deferred and q.served_by == "light" and not q.late
        assert a.png == f"light:{q.prompt}".encode() and a.model == "sd-turbo"
    assert engine.failed_batches == 1 and engine.fallback_light == 2 and engine.outcomes["failed"] == 0
    engine, answers = scenario("none")
    assert [a.query.outcome for a in answers] == ["failed"] * 2 and all(a.png is None for a in answers)
