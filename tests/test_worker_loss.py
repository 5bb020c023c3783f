"""Worker loss and health, one mechanism in the runtime layer: the dispatcher hands a lost worker's batch
back to the front of its stage and re-routes its queue, the controller re-plans for the workers in service,
the simulator injects faults with the same code, and the engine takes out workers that are lost, stall
or keep failing, then probes them back. Every query ends exactly once throughout."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffsim.config import ControllerConfig, HealthConfig, InputError, SimConfig, WorkerFault, parse_fault
from diffsim.query import Query
from diffsim.runtime.controller import Controller
from diffsim.runtime.dispatcher import Dispatcher
from diffsim.runtime.health import WorkerHealth, stall_limit_s
from diffsim.runtime.routing import Router
from diffsim.server.engine import Engine, EngineConfig
from diffsim.server.worker import WorkerLost
from diffsim.simulator import simulate
from diffsim.workload.traces import Trace
from sim_helpers import FixedPolicy, a100_cascade, fixed_plan
from test_engine import FAST_CONTROLLER, FakeWorker, fake_cascade, run, static
from virtual_time import loop_time, wait_until

# -- the health rules -------------------------------------------------------------------------------------


def test_failing_worker_is_taken_out_after_max_failures_in_a_row():
    h = WorkerHealth(2, HealthConfig(max_failures=3, probe_s=5))
    assert not h.batch_failed(0, 1.0, "boom")
    assert not h.batch_failed(0, 2.0, "boom")
    h.batch_succeeded(0)  # a success resets the count
    assert not h.batch_failed(0, 3.0, "boom") and not h.batch_failed(0, 4.0, "boom")
    assert h.batch_failed(0, 5.0, "boom")
    assert h.state == ["failing", "up"] and h.count_in_service() == 1
    assert "3 batches failed in a row; last: boom" in h.reason[0]
    assert not h.batch_failed(0, 6.0, "boom")  # out already: not taken out twice
    assert not h.probe_due(0, 9.9) and h.probe_due(0, 10.0)
    h.probe_failed(0, 10.0, "still broken")
    assert not h.probe_due(0, 14.9) and h.probe_due(0, 15.0)
    assert h.back(0, 15.0) and h.state == ["up", "up"] and h.consecutive_failures[0] == 0
    assert not h.back(0, 16.0)
    assert (h.removals, h.returns) == (1, 1)


def test_a_lost_worker_is_reported_once():
    h = WorkerHealth(3)
    assert h.lost(1, 2.0, "actor died")
    assert not h.lost(1, 2.5, "actor died again")
    assert h.state[1] == "lost" and h.removals == 1 and h.count_in_service() == 2


def test_stall_limit_has_a_floor():
    cfg = HealthConfig(stall_factor=10, stall_min_s=30)
    assert stall_limit_s(cfg, 0.5) == 30 and stall_limit_s(cfg, 4.0) == 40


@pytest.mark.parametrize("bad", [dict(max_failures=0), dict(probe_s=0), dict(stall_factor=-1), dict(stall_min_s=0)])
def test_health_config_is_checked(bad):
    with pytest.raises(InputError, match="health"):
        HealthConfig(**bad)


def test_fault_flags_parse_and_refuse_nonsense():
    assert parse_fault("3@120", False, "--fail-worker") == WorkerFault(120.0, (3,), False)
    assert parse_fault("2,3@1.5", True, "--recover-worker") == WorkerFault(1.5, (2, 3), True)
    for bad in ("3", "@120", "x@1", "3@", "3@-1", "-1@3"):
        with pytest.raises(InputError, match="--fail-worker"):
            parse_fault(bad, False, "--fail-worker")
    with pytest.raises(InputError, match="worker 4 does not exist"):
        SimConfig(cascade=a100_cascade(), gpus=4, faults=(WorkerFault(1.0, (4,)),))


# -- the dispatcher ---------------------------------------------------------------------------------------


def dispatcher(gpus=3, light=2, heavy=1, b=2, threshold=0.5):
    cascade = a100_cascade()
    d = Dispatcher(cascade, gpus, router=Router("least-loaded", np.random.default_rng(0)), seed=0)
    d.apply_plan(fixed_plan(cascade, light, heavy, b, b, threshold), 0.0, preloaded=True)
    return d


def queries(n, start=0):
    return [Query(i, i, 0.0, 5.0) for i in range(start, start + n)]


def test_a_lost_batch_goes_back_to_the_front_of_its_stage_in_order():
    d = dispatcher()
    for q in queries(6):
        d.admit(q, 0.0)
    assert [len(q) for q in d.queues] == [3, 3, 0]
    batch, _ = d.take_batch(0, 0.1)
    assert [q.id for q in batch.queries] == [0, 2] and all(q.stages == ["light"] for q in batch.queries)
    woken = d.remove_worker(0, 0.2, batch)
    assert woken == [1]
    assert d.stage_workers["light"] == [1] and d.roles[0] is None and d.inflight[0] == 0
    # the lost batch at the front, in its order; then worker 1's own queue; then worker 0's queued query
    assert [q.id for q in d.queues[1]] == [0, 2, 1, 3, 5, 4]
    assert all(q.stages == [] and q.batch_sizes == [] and q.outcome is None for q in d.queues[1])
    assert d.holding() == 6


def test_without_a_worker_left_the_stage_holds_its_queries_in_the_backlog():
    d = dispatcher(gpus=2, light=1, heavy=1)
    for q in queries(3):
        d.admit(q, 0.0)
    batch, _ = d.take_batch(0, 0.0)
    d.remove_worker(0, 1.0, batch)
    assert d.stage_workers["light"] == [] and [q.id for q in d.backlog["light"]] == [0, 1, 2]
    assert d.holding() == 3
    with pytest.raises(ValueError, match="already out of service"):
        d.remove_worker(0, 1.0)


def test_plans_give_roles_only_to_workers_in_service():
    cascade = a100_cascade()
    d = dispatcher(gpus=4, light=2, heavy=2)
    d.remove_worker(1, 1.0)
    d.remove_worker(2, 1.0)
    with pytest.raises(ValueError, match="2 of 4 are in service"):
        d.apply_plan(fixed_plan(cascade, 2, 1, 2, 2, 0.5), 2.0)
    d.apply_plan(fixed_plan(cascade, 1, 1, 2, 2, 0.5), 2.0)
    assert d.roles == ["light", None, None, "heavy"]
    d.restore_worker(2)
    assert d.roles[2] is None and d.workers_in_service() == 3
    d.apply_plan(fixed_plan(cascade, 2, 1, 2, 2, 0.5), 3.0)
    assert d.roles == ["light", None, "light", "heavy"]
    with pytest.raises(ValueError, match="in service already"):
        d.restore_worker(2)


def test_a_running_batch_must_be_handed_back_with_its_worker():
    d = dispatcher()
    d.admit(Query(0, 0, 0.0, 5.0), 0.0)
    batch, _ = d.take_batch(0, 0.0)
    with pytest.raises(ValueError, match="has a batch running"):
        d.remove_worker(0, 1.0)
    with pytest.raises(ValueError, match="handed back as worker 1"):
        d.remove_worker(1, 1.0, batch)


# -- the controller ---------------------------------------------------------------------------------------


def test_the_controller_replans_at_once_for_the_workers_in_service():
    cascade = a100_cascade()
    policy = FixedPolicy(fixed_plan(cascade, 1, 1, 1, 1))
    c = Controller(policy, 4, ControllerConfig(tick_s=1.0, replan_s=5.0))
    c.initial_plan(0.0)
    assert c.on_tick(1.0, 0, (0, 0), (0, 0), 4) is not None  # the first tick
    assert c.on_tick(2.0, 0, (0, 0), (0, 0), 4) is None
    assert c.on_tick(3.0, 0, (0, 0), (0, 0), 3) is not None  # a worker left: re-plan now
    assert policy.inputs[-1].gpus == 3
    assert c.on_tick(4.0, 0, (0, 0), (0, 0), 3) is None  # period restarts from the forced plan
    assert c.on_tick(5.0, 0, (0, 0), (0, 0), 0) is None  # nobody in service: the policy is not asked
    assert policy.inputs[-1].gpus == 3
    assert c.on_tick(6.0, 0, (0, 0), (0, 0), 2) is not None and policy.inputs[-1].gpus == 2


def test_replan_period_holds_on_a_jittered_clock():
    """Wall-clock ticks come a little late every time; re-plans must still come every replan_s."""
    cascade = a100_cascade()
    c = Controller(FixedPolicy(fixed_plan(cascade, 1, 1, 1, 1)), 2, ControllerConfig(tick_s=1.0, replan_s=5.0))
    c.initial_plan(0.0)
    rng = random.Random(3)
    replans = []
    for k in range(1, 61):
        now = k + rng.uniform(0.0, 0.3)  # each tick late by up to 30% of a tick
        if c.on_tick(now, 0, (0, 0), (0, 0)) is not None:
            replans.append(k)
    assert replans == [1, 6, 11, 16, 21, 26, 31, 36, 41, 46, 51, 56]


# -- the simulator ----------------------------------------------------------------------------------------


def poisson_trace(rate, duration, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration * 1.5)))
    t = t[t < duration]
    return Trace(arrival_s=t, prompt_id=np.arange(len(t)))


def test_simulated_loss_shrinks_the_plan_serves_the_lost_batch_and_grows_back():
    cascade = a100_cascade()
    trace = poisson_trace(6.0, 60.0)
    faults = (WorkerFault(20.0, (0, 1)), WorkerFault(40.0, (0, 1), recover=True))
    config = SimConfig(cascade=cascade, gpus=8, seed=0, faults=faults)
    started, enqueued = [], []
    result = simulate(config, trace, on_batch=started.append,
                      on_enqueue=lambda worker, query, now: enqueued.append((worker, query.id, now)))
    # every query ends exactly once: each arrival of the trace once, each with one outcome, and the counts
    # by outcome add up to the trace; a lost batch is served again, never failed
    assert [q.id for q in result.queries] == list(range(len(trace)))
    counts = Counter(q.outcome for q in result.queries)
    assert sum(counts.values()) == len(trace) and set(counts) <= {"completed", "dropped"}
    gpus_in_plans = {t: p.gpus for t, p in result.plans}
    assert gpus_in_plans[20.0] == 6 and gpus_in_plans[40.0] == 8  # re-planned at the fault's tick
    assert all(p.gpus == 6 for t, p in result.plans if 20.0 <= t < 40.0)
    # batches of workers 0 and 1 that were running at t=20 were re-routed and served again by a worker in
    # service: each query ran every stage at most once, and its answer came from the second run
    lost = [b for b in started if b.worker in (0, 1) and b.start_s < 20.0 < b.start_s + b.service_s]
    assert lost, "the scenario must lose a running batch"
    for b in lost:
        for q in b.queries:
            assert q.outcome == "completed" and q.stages.count(b.role) == 1
            [again] = [c for c in started if c is not b and c.role == b.role and any(x is q for x in c.queries)]
            assert again.worker not in (0, 1) and again.start_s >= 20.0
            assert q.finished_s >= again.start_s + again.service_s
    # while out, workers 0 and 1 are given neither queries nor batches; back in service, they work again
    assert not any(worker in (0, 1) and 20.0 <= now < 40.0 for worker, _, now in enqueued)
    assert not any(b.worker in (0, 1) and 20.0 <= b.start_s < 40.0 for b in started)
    assert any(b.worker in (0, 1) and b.start_s >= 40.0 for b in started)
    assert result.faults == [(20.0, (0, 1), False), (40.0, (0, 1), True)]
    # faults keep the run deterministic: the same seed ends every query the same way at the same time
    rerun = simulate(config, trace)
    assert [(q.outcome, q.finished_s) for q in rerun.queries] == [(q.outcome, q.finished_s) for q in result.queries]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.integers(2, 6),
    rate_per_gpu=st.floats(0.3, 2.0),
    routing=st.sampled_from(["least-loaded", "random"]),
    events=st.lists(st.tuples(st.floats(0.0, 30.0), st.sets(st.integers(0, 5), min_size=1, max_size=3),
                              st.booleans()), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
)
def test_random_faults_lose_no_query(gpus, rate_per_gpu, routing, events, seed):
    """Faults while the 30 s trace arrives (later ones would meet an empty system), on up to 3 of 2-6
    workers at once, at a load that keeps workers busy: running batches are lost, and sometimes every
    worker is out at once."""
    faults = tuple(WorkerFault(t, tuple(sorted(w % gpus for w in ws)), rec) for t, ws, rec in events)
    config = SimConfig(cascade=a100_cascade(), gpus=gpus, seed=seed, routing=routing, faults=faults)
    trace = poisson_trace(rate_per_gpu * gpus, 30.0, seed)
    started = []
    result = simulate(config, trace, on_batch=started.append)
    assert len(result.queries) == len(trace)
    for q in result.queries:
        assert q.outcome in ("completed", "dropped")  # lost batches are served again, never failed
        assert len(q.stages) == len(set(q.stages)) and q.stages in ([], ["light"], ["light", "heavy"])
    # what happened, replayed from the fault log: batches lost while running, every worker out at once
    out: set[int] = set()
    lost_running = all_out = False
    for t, workers, recover in result.faults:
        if recover:
            out -= set(workers)
            continue
        lost_running |= any(b.worker in workers and b.worker not in out and b.start_s < t < b.start_s + b.service_s
                            for b in started)
        out |= set(workers)
        all_out |= len(out) == gpus
    event(f"a running batch was lost: {lost_running}")
    event(f"every worker out at once: {all_out}")
    event(f"a worker came back: {any(recover for _, _, recover in result.faults)}")


def test_losing_every_worker_drops_what_cannot_wait_and_ends():
    config = SimConfig(cascade=a100_cascade(), gpus=2, faults=(WorkerFault(5.0, (0, 1)),))
    result = simulate(config, poisson_trace(4.0, 20.0))
    late_arrivals = [q for q in result.queries if q.arrival_s > 6.0]
    assert late_arrivals and all(q.outcome == "dropped" for q in late_arrivals)


# -- the engine -------------------------------------------------------------------------------------------


class ScriptedWorker(FakeWorker):
    """A fake worker whose ``run`` does what ``behaviour(job_number)`` says: "ok", "lost", "fail" or
    "hang" (never answers); ``probe`` raises until ``healthy`` is set."""

    def __init__(self, index, behaviour, **kw):
        super().__init__(index, {"light": 0.005, "heavy": 0.005}, **kw)
        self.behaviour = behaviour
        self.healthy = asyncio.Event()
        self.probes = 0

    async def run(self, job):
        what = self.behaviour(len(self.jobs))
        if what == "lost":
            self.jobs.append(job)
            raise WorkerLost("the actor died")
        if what == "hang":
            self.jobs.append(job)
            await asyncio.Event().wait()
        if what == "fail":
            self.jobs.append(job)
            raise RuntimeError("executor exploded")
        return await super().run(job)

    async def probe(self):
        self.probes += 1
        if not self.healthy.is_set():
            raise RuntimeError("not yet")
        return self._info()


def engine_with(workers, plan, health=HealthConfig(max_failures=2, probe_s=0.02, stall_min_s=1.0)):
    config = EngineConfig(cascade=fake_cascade(), gpus=len(workers), policy="static", static_plan=plan,
                          controller=FAST_CONTROLLER, batch_sizes=(1, 2, 4), health=health)
    return Engine(config, workers, clock=loop_time)


def test_a_lost_worker_s_batch_is_served_elsewhere_and_the_worker_comes_back():
    async def scenario():
        lost = ScriptedWorker(0, lambda n: "lost" if n == 0 else "ok")
        good = ScriptedWorker(1, lambda n: "ok")
        good.healthy.set()
        engine = engine_with([lost, good], static(0.0, 2, 0, lb=4))
        await engine.start()
        answers = await engine.generate(["a", "b"], [1, 2])  # least-loaded: to worker 0 first
        assert engine.health.state == ["lost", "up"] and engine.dispatcher.roles[0] is None
        await wait_until(lambda: engine.plan.gpus == 1, "the plan shrinks to one worker")
        lost.healthy.set()
        await wait_until(lambda: engine.health.state == ["up", "up"], "the probe brings worker 0 back")
        await wait_until(lambda: engine.dispatcher.roles == ["light", "light"], "the plan grows back")
        again = await engine.generate(["c"], [3])
        await engine.stop()
        return engine, lost, good, answers + again

    engine, lost, good, answers = run(scenario())
    assert [a.query.outcome for a in answers] == ["completed"] * 3
    assert lost.jobs[0].prompts == ("a",) and good.jobs[0].prompts == ("b",)  # "a" served again by 1
    assert [a.query.finished_s for a in answers[:2]] == pytest.approx([0.01, 0.005])  # "a" after "b"
    assert engine.lost_batches == 1 and engine.failed_batches == 0
    assert engine.outcomes["completed"] == 3 and sum(engine.outcomes.values()) == 3
    # probes every 0.02 s: at 0.02 and 0.04 s it is still down; healthy from 0.055 s, the 0.06 s probe succeeds
    assert lost.probes == 3 and engine.health.returns == 1


def test_a_worker_that_keeps_failing_is_taken_out_and_draws_no_more_traffic():
    async def scenario():
        bad = ScriptedWorker(0, lambda n: "fail")
        good = ScriptedWorker(1, lambda n: "ok")
        engine = engine_with([bad, good], static(0.0, 2, 0, lb=1))
        await engine.start()
        answers = []
        for i in range(12):  # one at a time: least-loaded sends each to worker 0 while it is in service
            answers += await engine.generate([f"q{i}"], [i])
        state = list(engine.health.state)
        await engine.stop()
        return engine, bad, answers, state

    engine, bad, answers, state = run(scenario())
    outcomes = [a.query.outcome for a in answers]
    assert outcomes == ["failed", "failed"] + ["completed"] * 10  # max_failures=2, then never routed to it
    assert len(bad.jobs) == 2 and state == ["failing", "up"]
    assert "2 batches failed in a row" in engine.health.reason[0]
    assert bad.probes == 2  # probed at 0.02 and 0.04 s of the 0.05 s run, still failing, still out


def test_a_worker_that_stops_answering_is_lost_after_its_stall_limit():
    async def scenario():
        hung = ScriptedWorker(0, lambda n: "hang")
        good = ScriptedWorker(1, lambda n: "ok")
        engine = engine_with([hung, good], static(0.0, 2, 0, lb=4),
                             HealthConfig(max_failures=2, probe_s=0.02, stall_factor=1.0, stall_min_s=0.3))
        await engine.start()
        answers = await engine.generate(["a"], [1])
        await engine.stop()
        return engine, hung, answers

    engine, hung, answers = run(scenario())
    assert answers[0].query.outcome == "completed" and len(hung.jobs) == 1
    # lost at its 0.3 s stall limit, then served by worker 1 in 5 ms
    assert answers[0].query.finished_s == pytest.approx(0.305) and answers[0].query.stages == ["light"]
    assert engine.health.state[0] == "lost" and "no answer" in engine.health.reason[0]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_workers_lost_at_random_moments_lose_no_query(seed):
    """Every accepted query is answered exactly once while workers die and come back at random."""
    rng = random.Random(seed)

    async def scenario():
        workers = [ScriptedWorker(w, lambda n, r=random.Random(seed * 10 + w): r.choice(["ok"] * 4 + ["lost", "fail"]))
                   for w in range(3)]
        for w in workers:
            w.healthy.set()
        engine = engine_with(workers, static(rng.random(), 2, 1, lb=rng.choice([1, 2, 4]), hb=2),
                             HealthConfig(max_failures=2, probe_s=0.01, stall_min_s=5.0))
        await engine.start()
        tasks, sent = [], 0
        for _ in range(30):
            n = rng.randint(1, 3)
            sent += n
            tasks.append(asyncio.create_task(engine.generate([f"p{sent}"] * n, [rng.randrange(100) for _ in range(n)])))
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await engine.stop()
        return engine, results, sent

    engine, results, sent = run(scenario(), timeout=60)
    answered = [a for r in results if not isinstance(r, BaseException) for a in r]
    assert all(not isinstance(r, BaseException) or type(r).__name__ == "Rejected" for r in results)
    ids = [a.query.id for a in answered]
    assert len(ids) == len(set(ids))  # one answer per query
    assert sum(engine.outcomes.values()) == sent and engine.pending == 0
    for a in answered:
        assert a.query.outcome in ("completed", "dropped", "failed")
        assert (a.png is not None) == (a.query.outcome == "completed")
        assert a.query.stages in ([], ["light"], ["light", "heavy"])  # a lost batch's stage is not counted twice
    # what the test is for happened (the same every run, on virtual time): batches were lost and failed,
    # workers were taken out and came back (seeds 1-4: 4-13 lost batches, 2-19 failed, 4-18 returns)
    assert engine.lost_batches >= 1 and engine.failed_batches >= 1
    assert engine.health.returns >= 1 and engine.health.removals >= engine.health.returns
