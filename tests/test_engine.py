"""The wall-clock engine with fake workers (no torch): routing and deferral, role switches, the drop rule,
admission, failing batches, and exactly one outcome per query.

The engine runs on virtual time (tests/virtual_time.py): a fake worker's sleep, the controller's ticks and
the deadlines all read the same virtual clock, so each scenario plays out the same on any machine, and the
tests pin exact times and counts."""

from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import replace

import numpy as np
import pytest

from diffsim.config import ControllerConfig
from diffsim.policies import make_policy
from diffsim.profiles import GpuProfile, build_cascade, load_cascades
from diffsim.resources import profiles_dir
from diffsim.server.engine import Engine, EngineConfig, Rejected, Unavailable
from diffsim.server.worker import BatchResult, ThreadWorker, WorkerInfo
from virtual_time import loop_time, run_virtual, wait_until

FAST_CONTROLLER = ControllerConfig(tick_s=0.05, replan_s=0.1)


def fake_cascade(slo_s: float = 5.0, light_ms=(20, 30, 40), heavy_ms=(60, 80, 100), disc_ms=(2, 2, 2)):
    """sdturbo-sdv15's curves with made-up latencies at batch sizes 1, 2, 4."""
    table = lambda ms: {"batch_sizes": [1, 2, 4], "p50_ms": list(ms)}  # noqa: E731
    profile = GpuProfile.model_validate({
        "gpu": "fake",
        "provenance": {"source": "test", "gpu": "fake", "date": "2024-01-01"},
        "models": {"sd-turbo": table(light_ms), "sd-v1.5": table(heavy_ms)},
        "discriminator": table(disc_ms),
    })
    cascades = load_cascades(profiles_dir() / "cascades.yaml")
    return replace(build_cascade("sdturbo-sdv15", profile, cascades), slo_s=slo_s)


def confidence_of_seed(seed: int) -> float:
    return (seed % 100) / 100.0


class FakeWorker:
    """A worker that sleeps (on virtual time: exactly ``delay_s``) instead of generating; images are
    ``b"<role>:<prompt>"``, the confidence of the image of seed s is (s mod 100) / 100; ``fail(job)`` makes
    a batch raise."""

    def __init__(self, index: int, delay_s=None, fail=None):
        self.index = index
        self.delay_s = delay_s or {"light": 0.01, "heavy": 0.02}
        self.fail = fail or (lambda job: False)
        self.jobs = []
        self.prepared = []

    def _info(self):
        return WorkerInfo(self.index, "fake", {"light": "sd-turbo", "heavy": "sd-v1.5"}, ("light", "heavy"))

    async def start(self, initial_role=None):
        return self._info()

    async def prepare(self, role):
        self.prepared.append(role)
        return self._info()

    async def run(self, job):
        self.jobs.append(job)
        delay = self.delay_s[job.role]
        await asyncio.sleep(delay)
        if self.fail(job):
            raise RuntimeError("executor exploded")
        confs = tuple(confidence_of_seed(s) for s in job.seeds) if job.score else None
        return BatchResult(tuple(f"{job.role}:{p}".encode() for p in job.prompts), confs, delay)

    async def probe(self):
        return self._info()

    async def stop(self):
        pass


def static(threshold, light=1, heavy=1, lb=4, hb=4):
    return {"threshold": threshold, "light_workers": light, "heavy_workers": heavy, "light_batch": lb,
            "heavy_batch": hb, "gpus": light + heavy}


def make_engine(cascade=None, *, plan=None, policy="static", workers=None, gpus=None, **kw):
    cascade = cascade or fake_cascade()
    if gpus is None:
        gpus = (plan["light_workers"] + plan["heavy_workers"]) if plan else 2
    workers = workers or [FakeWorker(w) for w in range(gpus)]
    config = EngineConfig(cascade=cascade, gpus=gpus, policy=policy, static_plan=plan, controller=FAST_CONTROLLER,
                          batch_sizes=(1, 2, 4), **kw)
    return Engine(config, workers, clock=loop_time)


def run(coro, timeout=30):
    """Run an engine scenario on virtual time; ``timeout`` (virtual seconds) is a failure guard only."""
    return run_virtual(coro, timeout)


def run_real(coro):
    """Run a scenario with real threads (ThreadWorker) on a real-time loop. Nothing in it waits on time:
    the 600 s are a failure guard only (pytest-timeout's 300 s comes first)."""
    return asyncio.run(asyncio.wait_for(coro, 600))


async def _serve(engine, prompts, seeds):
    await engine.start()
    try:
        return await engine.generate(prompts, seeds)
    finally:
        await engine.stop()


def test_low_confidence_is_deferred_to_heavy():
    engine = make_engine(plan=static(0.5))
    seeds = list(range(0, 100, 10))  # confidences 0.0, 0.1, ..., 0.9
    answers = run(_serve(engine, [f"p{s}" for s in seeds], seeds))
    assert [a.query.outcome for a in answers] == ["completed"] * len(seeds)
    for a in answers:
        q = a.query
        assert q.confidence == pytest.approx(confidence_of_seed(q.seed))
        assert q.deferred == (q.confidence < 0.5)
        assert a.model == ("sd-v1.5" if q.deferred else "sd-turbo")
        assert q.served_by == ("heavy" if q.deferred else "light")
        assert a.png == f"{q.served_by}:{q.prompt}".encode()
        assert q.stages == (["light", "heavy"] if q.deferred else ["light"])
    assert engine.outcomes["completed"] == len(seeds)


@pytest.mark.parametrize("threshold, deferred", [(0.0, False), (1.0, True)])
def test_threshold_zero_defers_nothing_and_one_defers_everything(threshold, deferred):
    engine = make_engine(plan=static(threshold))
    answers = run(_serve(engine, ["a"] * 6, [1, 20, 40, 60, 80, 99]))
    assert all(a.query.deferred is deferred for a in answers)
    assert all(a.model == ("sd-v1.5" if deferred else "sd-turbo") for a in answers)
    heavy_jobs = [j for w in engine.workers for j in w.jobs if j.role == "heavy"]
    assert bool(heavy_jobs) is deferred


def test_split_mode_sends_queries_straight_to_heavy_without_scoring():
    engine = make_engine(policy="clipper-heavy", gpus=2)
    answers = run(_serve(engine, ["a", "b", "c"], [1, 2, 3]))
    assert all(a.model == "sd-v1.5" and a.query.confidence is None and not a.query.deferred for a in answers)
    assert all(j.role == "heavy" and not j.score for w in engine.workers for j in w.jobs)


def test_measured_batch_time_replaces_the_profiles():
    workers = [FakeWorker(0, {"light": 0.05, "heavy": 0.05})]
    engine = make_engine(plan=static(0.0, 1, 0), workers=workers)
    [a] = run(_serve(engine, ["a"], [50]))
    assert a.query.service_s == pytest.approx(0.05)  # not the profile's 20 + 2 ms
    assert engine.dispatcher.busy_s[0] == pytest.approx(0.05)


class SwitchablePolicy:
    """A policy whose answer the test changes: the controller applies it at its next re-plan."""

    name = "switchable"

    def __init__(self, cascade, plan_spec):
        self.cascade = cascade
        self.set(plan_spec)

    def set(self, plan_spec):
        self.inner = make_policy("static", self.cascade, static_plan=plan_spec, batch_sizes=(1, 2, 4))

    reads_peak_demand = False  # a static plan

    def plan(self, inp):
        return self.inner.plan(inp)


class GatedWorker(FakeWorker):
    """A FakeWorker whose batches wait at a gate the test opens (no timing: the test decides when)."""

    def __init__(self, index, gate, **kw):
        super().__init__(index, {"light": 0.0, "heavy": 0.0}, **kw)
        self.gate = gate
        self.waiting = 0

    async def run(self, job):
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        return await super().run(job)


def test_controller_moves_workers_between_roles_and_loses_no_query():
    async def scenario():
        gate = asyncio.Event()
        workers = [GatedWorker(w, gate) for w in range(2)]
        cascade = fake_cascade()
        policy = SwitchablePolicy(cascade, static(0.0, 2, 0, lb=1))
        config = EngineConfig(cascade=cascade, gpus=2, controller=FAST_CONTROLLER, batch_sizes=(1, 2, 4), swap=True,
                              routing="random")
        engine = Engine(config, workers, policy=policy, clock=loop_time)
        await engine.start()
        assert engine.dispatcher.roles == ["light", "light"]
        pending = asyncio.gather(*(engine.generate([f"q{i}"], [i]) for i in range(12)))
        # both run a batch (held at the gate), ten are queued
        await wait_until(lambda: sum(w.waiting for w in workers) == 2, "both workers hold a batch")
        policy.set(static(1.0, 1, 1, lb=1, hb=1))
        await wait_until(lambda: engine.dispatcher.roles == ["light", "heavy"], "the controller's next re-plan")
        # swap mode: the switching worker loads its new model
        await wait_until(lambda: workers[1].prepared == ["heavy"], "worker 1 loads the heavy model")
        gate.set()
        answers = [a for group in await pending for a in group]
        await engine.stop()
        return engine, workers, answers

    engine, workers, answers = run(scenario())
    assert len(answers) == 12 and all(a.query.outcome == "completed" for a in answers)
    assert engine.outcomes["completed"] == 12
    assert all(j.role == "light" for j in workers[0].jobs)
    assert any(j.role == "heavy" for j in workers[1].jobs)
    # the two held at the gate ran under the old plan (threshold 0); the ten queued at the switch ran light
    # under the new plan, which defers everything
    assert [a.query.deferred for a in answers] == [False] * 2 + [True] * 10


@pytest.mark.parametrize("sweep_s, dropped_at", [(0.1, 0.4), (0.0, 0.41)])
def test_queries_that_miss_their_deadline_in_the_queue_are_dropped(sweep_s, dropped_at):
    # The profile says heavy takes 60 ms, but it takes 400 ms: the three heavy queries queued behind the
    # first cannot finish within 1.5 x 0.3 s = 0.45 s. The deadline sweep (every 0.1 s) drops them at
    # 0.4 s, the first sweep at which 0.4 + 0.06 s is past 0.45 s; without the sweep (0) the heavy worker's
    # next take drops them when it frees, at 0.01 + 0.4 s.
    cascade = fake_cascade(slo_s=0.3)
    workers = [FakeWorker(0), FakeWorker(1, {"light": 0.01, "heavy": 0.4})]
    engine = make_engine(cascade, plan=static(1.0, 1, 1, lb=4, hb=1), workers=workers, deadline_sweep_s=sweep_s)
    answers = run(_serve(engine, ["a"] * 4, [1, 2, 3, 4]))
    assert [a.query.outcome for a in answers] == ["completed", "dropped", "dropped", "dropped"]
    assert [a.query.finished_s for a in answers] == pytest.approx([0.41] + [dropped_at] * 3)
    assert [a.query.stages for a in answers] == [["light", "heavy"]] + [["light"]] * 3
    for a in answers:
        assert (a.png is None) == (a.query.outcome != "completed")
    assert engine.outcomes == {"completed": 1, "dropped": 3, "failed": 0, "rejected": 0}


def test_admission_rejects_when_the_queue_is_hopeless():
    # light batch of 1 takes 100 + 2 ms by the profile; limit 1.5 x 0.3 s = 0.45 s: four fit (0.408 s),
    # a fifth would finish at 0.51 s.
    cascade = fake_cascade(slo_s=0.3, light_ms=(100, 150, 200))
    workers = [FakeWorker(0, {"light": 0.1, "heavy": 0.1})]

    async def scenario():
        engine = make_engine(cascade, plan=static(0.0, 1, 0, lb=1), workers=workers)
        await engine.start()
        results = await asyncio.gather(*(engine.generate([f"q{i}"], [i]) for i in range(10)),
                                       return_exceptions=True)
        await engine.stop()
        return engine, results

    engine, results = run(scenario())
    assert [isinstance(r, Rejected) for r in results] == [False] * 4 + [True] * 6
    assert [r[0].query.finished_s for r in results[:4]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert all(r.decision.retry_after_s == 1 for r in results[4:])
    assert engine.outcomes == {"completed": 4, "dropped": 0, "failed": 0, "rejected": 6}


def test_a_failing_batch_fails_only_its_queries():
    boom = lambda job: "boom" in job.prompts  # noqa: E731
    workers = [FakeWorker(0, fail=boom)]

    async def scenario():
        engine = make_engine(plan=static(0.0, 1, 0, lb=4), workers=workers)
        await engine.start()
        first = await engine.generate(["x", "boom", "y"], [1, 2, 3])  # one batch of 3
        second = await engine.generate(["z"], [4])
        await engine.stop()
        return engine, first, second

    engine, first, second = run(scenario())
    assert [a.query.outcome for a in first] == ["failed"] * 3
    assert all("executor exploded" in a.query.error and a.png is None for a in first)
    assert second[0].query.outcome == "completed"
    assert engine.failed_batches == 1 and engine.outcomes == {"completed": 1, "dropped": 0, "failed": 3,
                                                              "rejected": 0}


def test_every_query_gets_exactly_one_outcome_under_random_load():
    """Random SLOs, batch sizes, thresholds, failures and workers up to 3x slower than the profile says. On
    virtual time each seed plays out the same every run, and across the seeds every outcome occurs (checked
    below): the property is checked where it can break."""
    seen = collections.Counter()

    async def scenario(seed):
        r = random.Random(seed)
        cascade = fake_cascade(slo_s=r.choice([0.2, 0.5, 2.0]))
        fail_every = r.choice([0, 3, 5])
        counter = {"n": 0}

        def fail(job):
            counter["n"] += 1
            return fail_every and counter["n"] % fail_every == 0

        # the profile says light 20-40 ms (+2 ms scoring), heavy 60-100 ms
        workers = [FakeWorker(w, {"light": r.uniform(0.005, 0.1), "heavy": r.uniform(0.01, 0.3)}, fail)
                   for w in range(3)]
        engine = make_engine(cascade, plan=static(r.random(), 1, 2, lb=r.choice([1, 2, 4]), hb=r.choice([1, 2, 4])),
                             workers=workers)
        await engine.start()
        calls = []
        sent = 0
        for _ in range(25):
            n = r.randint(1, 3)
            sent += n
            calls.append(asyncio.create_task(engine.generate([f"p{sent}"] * n, [r.randrange(100) for _ in range(n)])))
            await asyncio.sleep(r.uniform(0, 0.01))
        results = await asyncio.gather(*calls, return_exceptions=True)
        await engine.stop()
        return engine, results, sent

    for seed in range(8):
        engine, results, sent = run(scenario(seed))
        answered = 0
        for r in results:
            if isinstance(r, Rejected):
                continue
            assert not isinstance(r, BaseException), r
            for a in r:
                assert a.query.outcome in ("completed", "dropped", "failed")
                assert (a.png is not None) == (a.query.outcome == "completed")
                answered += 1
        assert sum(engine.outcomes.values()) == sent
        assert engine.outcomes["completed"] + engine.outcomes["dropped"] + engine.outcomes["failed"] == answered
        assert engine.pending == 0
        seen.update(outcome for outcome, n in engine.outcomes.items() if n)
    # seeds with each outcome: completed 8, dropped 7, failed 5, rejected 5 (the same every run)
    assert all(seen[outcome] >= 3 for outcome in ("completed", "dropped", "failed", "rejected")), seen


def test_stop_drains_admitted_work_and_refuses_new_work():
    async def scenario():
        engine = make_engine(plan=static(1.0))
        await engine.start()
        task = asyncio.create_task(engine.generate(["a", "b"], [1, 2]))
        await asyncio.sleep(0)
        await engine.stop()
        answers = await task
        with pytest.raises(Unavailable):
            await engine.generate(["c"], [3])
        return answers

    answers = run(scenario())
    assert [a.query.outcome for a in answers] == ["completed", "completed"]
    # the drain waited for both stages: a light batch of two (10 ms), then the heavy one (20 ms)
    assert [a.query.finished_s for a in answers] == pytest.approx([0.03, 0.03])


def test_controller_replans_on_the_wall_clock():
    """Ticks every 0.05 s of the engine's clock; plans at the start, at the first tick, then every 0.1 s."""
    async def scenario():
        engine = make_engine(plan=static(0.3))
        await engine.start()
        await asyncio.sleep(0.375)  # between the ticks at 0.35 and 0.40 s
        snap = engine.snapshot()
        plans_at = [t for t, _ in engine.plans]
        await engine.stop()
        return snap, plans_at

    snap, plans_at = run(scenario())
    assert snap["controller"]["ticks"] == 7
    assert plans_at == pytest.approx([0.0, 0.05, 0.15, 0.25, 0.35]) and snap["plan_id"] == 5
    assert snap["plan"]["threshold"] == 0.3


# -- ThreadWorker with fake executors -------------------------------------------------------------


class FakeExecutor:
    """Stands in for a backends executor: tiny PIL images, confidence from the seed; counts residency."""

    resident: dict = {}

    def __init__(self, model: str, worker: int = 0, delay_s: float = 0.0, fail_prompt: str | None = None):
        self.model = model
        self.worker = worker
        self.delay_s = delay_s
        self.fail_prompt = fail_prompt
        self.loaded = False
        self.max_resident = 0

    def load(self):
        if not self.loaded:
            self.loaded = True
            FakeExecutor.resident[self.worker] = FakeExecutor.resident.get(self.worker, 0) + 1
            self.max_resident = FakeExecutor.resident[self.worker]

    def unload(self):
        if self.loaded:
            self.loaded = False
            FakeExecutor.resident[self.worker] -= 1

    def generate(self, prompts, seeds):
        import time

        from PIL import Image

        if self.fail_prompt is not None and self.fail_prompt in prompts:
            raise RuntimeError("executor exploded")
        time.sleep(self.delay_s)
        return [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]

    def score(self, images):
        return np.array([im.getpixel((0, 0))[0] / 100.0 % 1.0 for im in images])

    def synchronize(self):
        pass


def test_thread_worker_swap_keeps_one_model_resident():
    made = {}

    def factory(role):
        made[role] = FakeExecutor("sd-turbo" if role == "light" else "sd-v1.5", worker=42)
        return made[role]

    from diffsim.server.worker import BatchJob

    async def scenario():
        w = ThreadWorker(0, factory, swap=True)
        info = await w.start("light")
        assert info.loaded == ("light",)
        info = await w.prepare("heavy")
        assert info.loaded == ("heavy",)
        result = await w.run(BatchJob("light", ("a", "b"), (10, 20), True))
        assert result.confidences == (0.1, 0.2) and len(result.images_png) == 2
        assert result.images_png[0].startswith(b"\x89PNG")
        info = await w.prepare("light")
        await w.stop()
        return info

    info = run_real(scenario())
    assert info.loaded == ("light",)
    assert FakeExecutor.resident[42] == 0
    assert max(e.max_resident for e in made.values()) == 1


def test_thread_worker_without_swap_keeps_both_models():
    async def scenario():
        w = ThreadWorker(0, lambda role: FakeExecutor(role, worker=43), swap=False)
        info = await w.start("light")
        await w.stop()
        return info

    assert run_real(scenario()).loaded == ("light", "heavy")


def test_controller_gets_the_in_system_count_each_tick():
    """demand: in-system (the artifact's estimator) needs the queries in the system at every tick: the engine
    hands it over, so re-planning goes on (a missing count would make every re-plan fail)."""
    async def scenario():
        engine = make_engine(plan=static(0.3))
        engine.controller.config = replace(engine.controller.config, demand="in-system")
        await engine.start()
        await asyncio.sleep(0.375)  # between the ticks at 0.35 and 0.40 s
        snap = engine.snapshot()
        samples = engine.controller.estimator.samples
        await engine.stop()
        return snap, samples

    snap, samples = run(scenario())
    assert samples == 7  # one per tick
    assert snap["plan_id"] == 5  # as on the arrival estimator: no re-plan failed
