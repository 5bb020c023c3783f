"""The server's promises under overload, in the runtime layer and the engine: batch times learned from
measurements, admission that predicts the whole path (light, then heavy at the deferral in force),
deadlines enforced on the clock while a request waits, and refused demand counted as demand."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from diffsim.query import Query
from diffsim.runtime.admission import predict
from diffsim.runtime.batching import ServiceTimes
from diffsim.runtime.dispatcher import Dispatcher
from diffsim.runtime.routing import Router
from diffsim.config import ControllerConfig
from diffsim.server.engine import Engine, EngineConfig, Rejected
from sim_helpers import a100_cascade, fixed_plan
from test_engine import fake_cascade, make_engine, run, static
from test_worker_loss import ScriptedWorker
from virtual_time import loop_time


def test_measured_batch_times_correct_the_profile_per_stage():
    cascade = a100_cascade()
    st = ServiceTimes(cascade, alpha=0.5)
    base1, base4 = st("light", 1, True), st("light", 4, True)
    st.observe("light", 4, True, 2 * base4)  # twice as slow as the profile says
    assert st.factor["light"] == pytest.approx(1.5) and st.factor["heavy"] == 1.0
    assert st("light", 1, True) == pytest.approx(1.5 * base1)  # every batch size of the stage follows
    st.observe("light", 1, True, 2 * base1)
    assert st.factor["light"] == pytest.approx(1.75) and st.observed["light"] == 2
    st.observe("light", 1, True, 0.0)  # not a measurement
    assert st.factor["light"] == pytest.approx(1.75)


def test_the_dispatcher_judges_batches_by_its_measured_estimates():
    cascade = a100_cascade()
    d = Dispatcher(cascade, 2, router=Router("least-loaded", np.random.default_rng(0)), seed=0)
    d.apply_plan(fixed_plan(cascade, 1, 1, 2, 2, 0.0), 0.0, preloaded=True)
    d.admit(Query(0, 0, 0.0, 5.0), 0.0)
    batch, _ = d.take_batch(0, 0.0)
    profile_s = batch.service_s
    d.complete_batch(batch, 1.0, [0.9], run_s=10 * profile_s)  # a measured batch, much slower
    d.admit(Query(1, 1, 1.0, 5.0), 1.0)
    batch, _ = d.take_batch(0, 1.0)
    assert batch.service_s == pytest.approx(1.4 * profile_s)  # one batch moves it by 3x at most: 1 + 0.2 x 2
    assert d.busy_remaining_s("light", 1.0) == pytest.approx(batch.service_s)


def test_stalls_cannot_lock_the_server_out():
    """Batches 1000x slower than the profile, again and again: the estimate of a batch of one stops at the
    drop limit, so a new query on the idle stage is still admitted and served (and measured) -- were it
    to pass the limit, every query would be refused or dropped and no batch would ever correct it."""
    cascade = a100_cascade()
    d = Dispatcher(cascade, 1, router=Router("least-loaded", np.random.default_rng(0)), seed=0)
    d.apply_plan(fixed_plan(cascade, 1, 0, 1, 1, 0.0), 0.0, preloaded=True)
    t = 0.0
    for i in range(40):
        assert predict(d, ["light"], t, 5.0, 1.5).accept
        d.admit(Query(i, i, t, 5.0), t)
        batch, dropped = d.take_batch(0, t)
        assert batch is not None and not dropped
        stall = 1000 * d.service.profile_s("light", 1, batch.with_discriminator)
        t += stall
        d.complete_batch(batch, t, [0.9], run_s=stall)
    assert d.service.factor["light"] > 100  # the learnt factor is kept (3x a batch at most) ...
    assert d.service("light", 1, batch.with_discriminator) <= 7.5  # ... but a batch of one still fits


def test_the_stall_cap_holds_for_a_profile_without_batch_one():
    from dataclasses import replace

    from diffsim.profiles import LatencyTable

    cascade = a100_cascade()
    light = LatencyTable(batch_sizes=[2, 4], p50_ms=[cascade.light.latency_ms(2), cascade.light.latency_ms(4)])
    times = ServiceTimes(replace(cascade, light=light), limit_s=7.5)
    for _ in range(40):
        times.observe("light", 2, False, 1000.0)
    assert times("light", 2, False) <= 7.5  # the smallest batch the profile has still fits the limit


def overloaded_heavy(deferral_threshold):
    """One light and one heavy worker; the heavy queue holds 40 queries of a 3.68 s batch of 4."""
    cascade = a100_cascade()
    d = Dispatcher(cascade, 2, router=Router("least-loaded", np.random.default_rng(0)), seed=0)
    d.apply_plan(fixed_plan(cascade, 1, 1, 4, 4, deferral_threshold), 0.0, preloaded=True)
    for i in range(40):
        d._enter_stage(Query(i, i, 0.0, 5.0), "heavy", 0.0)
    return d


def test_admission_refuses_what_the_heavy_stage_cannot_serve():
    d = overloaded_heavy(0.5)  # the plan defers about half
    decision = predict(d, ["light"], 0.0, 5.0, 1.5)
    assert not decision.accept and decision.predicted_completion_s > 7.5
    assert decision.retry_after_s >= 1
    d = overloaded_heavy(0.0)  # nothing is deferred: the heavy queue is none of a new query's business
    assert predict(d, ["light"], 0.0, 5.0, 1.5).accept


def test_expired_queries_leave_the_worker_queues():
    cascade = a100_cascade()
    d = Dispatcher(cascade, 1, router=Router("least-loaded", np.random.default_rng(0)), seed=0)
    d.apply_plan(fixed_plan(cascade, 1, 0, 1, 1, 0.0), 0.0, preloaded=True)
    old, new = Query(0, 0, 0.0, 5.0), Query(1, 1, 7.0, 5.0)
    d.admit(old, 0.0)
    d.admit(new, 7.0)
    assert d.expire_queued(7.45) == 1  # 7.45 s + a light batch of one is past 1.5 x 5 s for the old one
    assert old.outcome == "dropped" and old.finished_s == 7.45 and new.outcome is None
    assert list(d.queues[0]) == [new] and d.finished == 1


def test_a_request_is_answered_504_when_its_time_is_up_not_when_a_worker_frees():
    async def scenario():
        blocker = asyncio.Event()
        release = asyncio.Event()

        class Blocking(ScriptedWorker):
            async def run(self, job):
                if "block" in job.prompts:
                    blocker.set()
                    await release.wait()
                return await super().run(job)

        worker = Blocking(0, lambda n: "ok")
        engine = make_engine(fake_cascade(slo_s=0.3), plan=static(0.0, 1, 0, lb=1), workers=[worker],
                             admission=False)
        await engine.start()
        first = asyncio.create_task(engine.generate(["block"], [1]))
        await blocker.wait()
        second = asyncio.create_task(engine.generate(["waits"], [2]))
        answers = await second  # answered while the worker is still blocked
        assert not release.is_set()
        release.set()
        await first
        await engine.stop()
        return answers

    [answer] = run(scenario())
    assert answer.query.outcome == "dropped" and answer.png is None
    # the sweeps run every 0.1 s: at 0.4 s the light batch (22 ms by the profile) could still finish within
    # 1.5 x 0.3 s; at 0.5 s it could not: answered then, with the worker still blocked
    assert answer.query.finished_s == pytest.approx(0.5) and answer.query.latency_s == pytest.approx(0.5)


def test_refused_requests_count_as_demand():
    async def scenario():
        config = EngineConfig(cascade=fake_cascade(slo_s=0.3, light_ms=(400, 500, 600)), gpus=1, policy="static",
                              static_plan=static(0.0, 1, 0, lb=1), batch_sizes=(1, 2, 4),
                              controller=ControllerConfig(tick_s=3600.0))  # no tick reads the counter first
        engine = Engine(config, [ScriptedWorker(0, lambda n: "ok")], clock=loop_time)
        await engine.start()
        results = await asyncio.gather(*(engine.generate([f"q{i}"], [i]) for i in range(10)),
                                       return_exceptions=True)
        arrivals, _, _ = engine.dispatcher.tick_stats()
        await engine.stop()
        return results, arrivals

    results, arrivals = run(scenario())
    # a light batch of one takes 0.402 s by the profile: only the first fits in 1.5 x 0.3 s
    assert [isinstance(r, Rejected) for r in results] == [False] + [True] * 9
    assert arrivals == 10  # every request, admitted or refused


def test_the_simulator_applies_the_server_s_admission_and_deadline_rules():
    """With admission and the deadline sweep on, an overloaded simulated server refuses at the door and
    answers hopeless queued queries early, as diffsim serve does; every query still ends once."""
    from dataclasses import replace

    from diffsim.config import SimConfig
    from diffsim.simulator import simulate
    from test_worker_loss import poisson_trace

    cascade = replace(a100_cascade(), slo_s=2.0)
    trace = poisson_trace(40.0, 20.0, seed=1)  # far beyond two GPUs
    base = SimConfig(cascade=cascade, gpus=2, seed=0, policy="clipper-light")
    plain = simulate(base, trace)
    served = simulate(replace(base, admission=True, deadline_sweep_s=0.1), trace)
    outcomes = lambda r: {o: sum(q.outcome == o for q in r.queries) for o in ("completed", "dropped", "rejected")}  # noqa: E731
    assert outcomes(plain)["rejected"] == 0 and outcomes(plain)["dropped"] > 0
    got = outcomes(served)
    assert got["rejected"] > 0 and sum(got.values()) == len(trace)
    completed = [q for q in served.queries if q.outcome == "completed"]
    within = sum(q.latency_s <= 1.5 * 2.0 for q in completed) / len(completed)
    assert within >= 0.9  # what is admitted is served within the drop limit (the 90% target)
    assert len(completed) >= outcomes(plain)["completed"] * 0.9  # refusing early costs hardly any throughput
    for q in served.queries:
        if q.outcome == "dropped":  # answered when its time was up, not when a worker got to it
            assert q.finished_s - q.arrival_s <= 1.5 * 2.0 + 0.1 + 1e-9
