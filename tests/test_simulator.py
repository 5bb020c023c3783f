"""The SimPy driver and the dispatcher behind it: golden cases, invariants (hypothesis), determinism."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_helpers import FixedPolicy, ScriptedPolicy, a100_cascade, fixed_plan

from diffsim.runtime.batching import service_time_s
from diffsim.config import ControllerConfig, SimConfig, WorkerFault
from diffsim.errors import InputError
from diffsim.simulator import simulate
from diffsim.workload.traces import Trace

CASCADE = a100_cascade()
LIGHT1 = 0.100  # sd-turbo, batch of 1
DISC = 0.020
HEAVY1 = 1.780  # sd-v1.5, batch of 1
LIMIT = 1.5 * CASCADE.slo_s
EPS = 1e-9


def trace_of(arrivals, prompt_ids=None) -> Trace:
    arrivals = np.asarray(arrivals, dtype=float)
    ids = np.arange(1, len(arrivals) + 1) if prompt_ids is None else np.asarray(prompt_ids)
    return Trace(arrival_s=arrivals, prompt_id=ids)


def run(plan_or_policy, arrivals, *, gpus=16, prompt_ids=None, hooks=False, **cfg):
    policy = plan_or_policy if hasattr(plan_or_policy, "plan") else FixedPolicy(plan_or_policy)
    config = SimConfig(cascade=cfg.pop("cascade", CASCADE), gpus=gpus, **cfg)
    trace = arrivals if isinstance(arrivals, Trace) else trace_of(arrivals, prompt_ids)
    if not hooks:
        return simulate(config, trace, policy=policy)
    batches, enqueues = [], []
    result = simulate(
        config, trace, policy=policy,
        on_batch=lambda b: batches.append((b, [q.id for q in b.queries], [len(q.stages) - 1 for q in b.queries])),
        on_enqueue=lambda w, q, now: enqueues.append((w, (q.id, len(q.stages)), now)),
    )
    return result, batches, enqueues


def confidence_above(threshold, n):
    """Prompt ids whose sampled confidence (seed 0) is >= threshold, and ones below it."""
    from diffsim.runtime.confidence import Confidences

    conf = Confidences.from_curve(CASCADE.deferral, 0)
    above = [p for p in range(1, 5000) if conf.of(p) >= threshold][:n]
    below = [p for p in range(1, 5000) if conf.of(p) < threshold][:n]
    return above, below


# -- golden cases -----------------------------------------------------------------------------------


def test_cascade_light_and_deferred_latency():
    above, below = confidence_above(0.3, 1)
    plan = fixed_plan(CASCADE, 1, 1, 1, 1, threshold=0.3)
    r = run(plan, [0.5, 3.0], gpus=2, prompt_ids=[above[0], below[0]])
    light, deferred = r.queries
    assert (light.outcome, light.served_by, light.deferred) == ("completed", "light", False)
    assert light.latency_s == pytest.approx(LIGHT1 + DISC)
    assert (deferred.outcome, deferred.served_by, deferred.deferred) == ("completed", "heavy", True)
    assert deferred.latency_s == pytest.approx(LIGHT1 + DISC + HEAVY1)
    assert deferred.stages == ["light", "heavy"] and deferred.batch_sizes == [1, 1]
    assert deferred.confidence < 0.3 <= light.confidence
    assert r.duration_s == pytest.approx(3.0 + LIGHT1 + DISC + HEAVY1)
    assert sum(r.worker_busy_s) == pytest.approx(2 * (LIGHT1 + DISC) + HEAVY1)
    assert r.plans[0][0] == 0.0 and r.plans[0][1] is plan
    assert [t for t, _ in r.plans] == [0.0, 1.0]  # re-plan at the first tick; run ends before t=6
    assert [t for t, _, _ in r.demand] == [1.0, 2.0, 3.0, 4.0]
    assert r.demand[0][1] == 1.0 and r.demand[1][1] == 0.0 and r.demand[2][1] == 1.0
    assert r.events > 0


def test_split_mode_sends_light_share_without_discriminator():
    plan = fixed_plan(CASCADE, 4, 12, 1, 1, mode="split", light_share=0.3)
    r = run(plan, np.arange(400) * 0.5, prompt_ids=np.arange(400) % 50 + 1)
    served = Counter(q.served_by for q in r.queries)
    assert served["light"] / 400 == pytest.approx(0.3, abs=0.06)
    assert all(q.confidence is None and not q.deferred for q in r.queries)
    for q in r.queries:
        assert q.service_s == pytest.approx(LIGHT1 if q.served_by == "light" else HEAVY1)


def test_batch_forms_from_simultaneous_arrivals():
    plan = fixed_plan(CASCADE, 1, 0, 4, 1, threshold=0.0)
    r = run(plan, [1.0] * 6, gpus=1)
    assert [q.batch_sizes for q in r.queries] == [[4]] * 4 + [[2]] * 2
    t4 = service_time_s(CASCADE, "light", 4, True)
    t2 = service_time_s(CASCADE, "light", 2, True)
    assert [q.latency_s for q in r.queries] == pytest.approx([t4] * 4 + [t4 + t2] * 2)


def test_batch_timeout_waits_to_fill():
    plan = fixed_plan(CASCADE, 1, 0, 4, 1, threshold=0.0)
    r = run(plan, [1.0, 1.1, 1.2, 2.0], gpus=1, batch_timeout_s=0.5)
    # The first three wait until the oldest has waited 0.5 s, then run together; the fourth alone.
    t3 = service_time_s(CASCADE, "light", 3, True)
    assert [q.batch_sizes for q in r.queries] == [[3], [3], [3], [1]]
    assert r.queries[0].finished_s == pytest.approx(1.5 + t3)


def test_drop_rule_under_overload():
    plan = fixed_plan(CASCADE, 0, 1, 1, 1, mode="split", light_share=0.0)
    r = run(plan, [0.0] * 6, gpus=1)  # six heavy queries, one heavy worker at batch 1 (1.78 s each)
    outcomes = [q.outcome for q in r.queries]
    # Served back to back: the 5th would start at 7.12 s and end after 7.5 s -> dropped, and so the 6th.
    assert outcomes == ["completed"] * 4 + ["dropped"] * 2
    assert r.queries[4].finished_s == pytest.approx(4 * HEAVY1)
    for q in r.queries:
        if q.outcome == "completed":
            assert q.latency_s <= LIMIT + EPS


def test_backlog_waits_for_workers_then_expires():
    # No heavy worker at first: deferred queries wait in the heavy backlog; at t=1 a heavy worker
    # appears and takes them. Later deferrals with no heavy worker expire from the backlog.
    above, below = confidence_above(0.5, 3)
    no_heavy = fixed_plan(CASCADE, 1, 0, 1, 1, threshold=0.5)
    with_heavy = fixed_plan(CASCADE, 1, 1, 1, 1, threshold=0.5)
    policy = ScriptedPolicy([no_heavy, with_heavy, no_heavy])
    r = run(policy, [0.1, 0.2, 7.0], gpus=2, prompt_ids=below[:3],
            controller=ControllerConfig(tick_s=1.0, replan_s=5.0))
    first, second, late = r.queries
    assert first.outcome == second.outcome == "completed" and first.served_by == "heavy"
    assert first.finished_s == pytest.approx(1.0 + HEAVY1)  # waited in the backlog until t=1
    assert late.outcome == "dropped" and late.deferred
    # Dropped at the first tick where even a batch of one could not finish within 1.5 x SLO.
    assert late.finished_s - late.arrival_s + HEAVY1 > LIMIT
    assert late.finished_s - 1.0 - late.arrival_s + HEAVY1 <= LIMIT


def test_role_switch_keeps_queued_work_and_swap_time():
    # 2 heavy workers, a burst of heavy work; then the plan moves one of them to light.
    heavy2 = fixed_plan(CASCADE, 0, 2, 1, 1, mode="split", light_share=0.0)
    heavy1 = fixed_plan(CASCADE, 1, 1, 1, 1, mode="split", light_share=0.0)
    policy = ScriptedPolicy([heavy2, heavy1])
    r, batches, enqueues = run(policy, [0.0] * 6, gpus=2, hooks=True, swap_s=0.3, seed=3)
    assert all(q.outcome in ("completed", "dropped") for q in r.queries)
    assert r.plans[1][0] == 1.0
    after = [b for b, _, _ in batches if b.start_s > 1.0]
    assert after and {b.worker for b in after} == {0}  # worker 1 went light: only worker 0 serves heavy
    moved = {key for w, key, t in enqueues if t == 1.0}
    assert moved  # worker 1's queued queries were re-routed at the switch, not lost
    assert all(w == 0 for w, key, t in enqueues if t == 1.0)


def test_swap_time_delays_a_switching_worker():
    light = fixed_plan(CASCADE, 1, 0, 1, 1, threshold=0.0)
    heavy = fixed_plan(CASCADE, 0, 1, 1, 1, mode="split", light_share=0.0)
    r = run(ScriptedPolicy([light, heavy]), [0.0, 1.5], gpus=1, swap_s=2.0)
    a, b = r.queries
    assert a.served_by == "light" and a.latency_s == pytest.approx(LIGHT1 + DISC)
    # The worker switched to heavy at t=1 and cannot serve before t=3.
    assert b.served_by == "heavy" and b.finished_s == pytest.approx(3.0 + HEAVY1)


def test_least_loaded_routing_spreads_a_burst():
    plan = fixed_plan(CASCADE, 4, 0, 1, 1, threshold=0.0)
    r, batches, _ = run(plan, [0.0] * 8, gpus=4, routing="least-loaded", hooks=True)
    per_worker = Counter(b.worker for b, _, _ in batches)
    assert per_worker == {0: 2, 1: 2, 2: 2, 3: 2}


SCAN_CHECKED = [
    dict(policy="diffserve", rate=60.0, faults=((20.0, (2, 3, 5), False), (35.0, (2, 5), True))),
    dict(policy="proteus", rate=80.0, swap_s=1.0, batch_timeout_s=0.1),
    dict(policy="diffserve", rate=70.0, admission=True, deadline_sweep_s=0.1, service_time="sampled",
         faults=((10.0, (0, 1, 2, 3), False), (30.0, (0, 1, 2, 3), True))),
]


@pytest.mark.parametrize("case", SCAN_CHECKED)
def test_least_loaded_index_chooses_what_the_scan_chooses_in_whole_runs(monkeypatch, case):
    """Every placement of a run with faults, swaps, drops, admission and sweeps: the dispatcher's load
    index holds every worker's true load and picks the worker the full scan (Router.choose) picks."""
    from diffsim.config import WorkerFault
    from diffsim.runtime.dispatcher import Dispatcher
    from diffsim.runtime.routing import Router

    scan = Router("least-loaded", np.random.default_rng(0))
    place = Dispatcher._place
    checked = [0]

    def checked_place(self, query, role, now, front=False):
        if self.stage_workers[role]:
            assert self._index.load == [self._loads[w] for w in range(self.gpus)]
            assert self._index.least_loaded(role) == scan.choose(self.stage_workers[role], self._loads)
            checked[0] += 1
        return place(self, query, role, now, front)

    monkeypatch.setattr(Dispatcher, "_place", checked_place)
    case = dict(case)
    rate = case.pop("rate")
    faults = tuple(WorkerFault(t, ws, rec) for t, ws, rec in case.pop("faults", ()))
    rng = np.random.default_rng(4)
    n = int(rate * 45)
    arrivals = np.sort(rng.uniform(0, 45, n))
    config = SimConfig(cascade=CASCADE, gpus=8, routing="least-loaded", faults=faults, **case)
    r = simulate(config, trace_of(arrivals, rng.integers(1, 5000, n)))
    assert checked[0] >= n and all(q.outcome is not None for q in r.queries)
    assert Counter(q.outcome for q in r.queries)["dropped"] > 0  # overloaded: the drop paths ran too


def test_deferral_fraction_follows_the_curve():
    t = 0.1
    plan = fixed_plan(CASCADE, 6, 10, 1, 1, threshold=t)
    n = 4000
    r = run(plan, np.arange(n) * 0.2, prompt_ids=np.arange(1, n + 1))
    scored = [q for q in r.queries if q.confidence is not None]
    assert len(scored) == n  # the light stage has ample capacity: everyone is scored
    frac = sum(q.deferred for q in scored) / n
    assert frac == pytest.approx(CASCADE.deferral(t), abs=0.025)


def test_confidences_from_csv(tmp_path):
    path = tmp_path / "conf.csv"
    path.write_text("prompt_id,confidence\n1,0.9\n2,0.01\n")
    plan = fixed_plan(CASCADE, 1, 1, 1, 1, threshold=0.05)
    r = run(plan, [0.0, 0.5], gpus=2, prompt_ids=[1, 2], confidences_path=path)
    assert [q.served_by for q in r.queries] == ["light", "heavy"]
    with pytest.raises(InputError, match="prompt id 3"):
        run(plan, [0.0], gpus=2, prompt_ids=[3], confidences_path=path)


def test_empty_trace_and_progress(capsys):
    plan = fixed_plan(CASCADE, 1, 1, 1, 1)
    r = run(plan, [], gpus=2)
    assert r.queries == [] and r.duration_s == 0.0 and len(r.plans) == 1
    config = SimConfig(cascade=CASCADE, gpus=2)
    r = simulate(config, trace_of([0.0, 2.5]), policy=FixedPolicy(plan), progress=True)
    assert len(r.queries) == 2
    assert capsys.readouterr().out == ""  # the bar goes to stderr


# -- the dispatcher on its own: what a real run hands it ---------------------------------------------


def _dispatcher(plan, gpus, confidences=None):
    from diffsim.runtime.confidence import Confidences
    from diffsim.runtime.dispatcher import Dispatcher
    from diffsim.runtime.routing import Router

    if confidences == "curve":
        confidences = Confidences.from_curve(CASCADE.deferral, 0)
    d = Dispatcher(CASCADE, gpus, router=Router("least-loaded", np.random.default_rng(0)), confidences=confidences)
    d.apply_plan(plan, 0.0, preloaded=True)
    return d


def _admit(d, ids, now=0.0):
    from diffsim.query import Query

    queries = [Query(i, i, now, CASCADE.slo_s) for i in ids]
    for q in queries:
        d.admit(q, now)
    return queries


def test_measured_confidences_decide_deferral_and_measured_time_is_booked():
    plan = fixed_plan(CASCADE, 1, 1, 4, 1, threshold=0.3)
    d = _dispatcher(plan, 2)  # no per-prompt source: a real run's dispatcher
    queries = _admit(d, [1, 2, 3])
    light = d.roles.index("light")
    batch, _ = d.take_batch(light, 0.0)
    assert [q.service_s for q in queries] == [0.0] * 3  # booked when the batch ends, not when it starts
    woken = d.complete_batch(batch, 0.5, [0.9, 0.1, 0.3], run_s=0.5)
    assert [q.confidence for q in queries] == [0.9, 0.1, 0.3]
    assert [q.outcome for q in queries] == ["completed", None, "completed"]  # 0.1 < t; 0.3 is not below
    assert queries[1].deferred and woken == [d.roles.index("heavy")]
    assert [q.service_s for q in queries] == [0.5] * 3 and d.busy_s[light] == 0.5 and d.inflight[light] == 0
    assert d.finished == 2
    with pytest.raises(ValueError, match="2 confidences for a batch of 1"):
        d.complete_batch(d.take_batch(woken[0], 0.5)[0], 1.0, [0.1, 0.2])


def test_a_light_batch_needs_scores_or_a_source():
    d = _dispatcher(fixed_plan(CASCADE, 1, 1, 1, 1, threshold=0.3), 2)
    _admit(d, [1])
    batch, _ = d.take_batch(d.roles.index("light"), 0.0)
    with pytest.raises(ValueError, match="no source"):
        d.complete_batch(batch, 0.1)


def test_without_measured_scores_the_source_decides_and_profile_time_is_booked():
    above, below = confidence_above(0.3, 1)
    d = _dispatcher(fixed_plan(CASCADE, 1, 1, 2, 1, threshold=0.3), 2, "curve")
    a, b = _admit(d, [above[0], below[0]])
    batch, _ = d.take_batch(d.roles.index("light"), 0.0)
    d.complete_batch(batch, batch.service_s)
    assert a.outcome == "completed" and b.deferred and b.outcome is None
    assert a.service_s == b.service_s == batch.service_s == service_time_s(CASCADE, "light", 2, True)


def test_a_failed_batch_fails_its_queries_and_frees_the_worker():
    plan = fixed_plan(CASCADE, 1, 1, 2, 1, threshold=0.3)
    d = _dispatcher(plan, 2)
    queries = _admit(d, [1, 2, 3])
    light = d.roles.index("light")
    batch, _ = d.take_batch(light, 0.0)
    assert d.inflight[light] == 2
    d.fail_batch(batch, 0.25, "boom", run_s=0.25)
    assert [(q.outcome, q.error, q.finished_s) for q in queries[:2]] == [("failed", "boom", 0.25)] * 2
    assert d.finished == 2 and d.inflight[light] == 0 and d.busy_s[light] == 0.25
    assert [q.service_s for q in queries[:2]] == [0.25, 0.25]
    nxt, _ = d.take_batch(light, 0.25)  # the worker takes its next batch
    assert [q.id for q in nxt.queries] == [3]
    d.complete_batch(nxt, 0.4, [0.9])
    assert queries[2].outcome == "completed" and d.finished == 3 and not d.holding()


def test_a_failed_batch_starts_a_pending_swap():
    light_plan = fixed_plan(CASCADE, 1, 0, 1, 1, threshold=0.0)
    d = _dispatcher(light_plan, 1)
    d.swap_s = 2.0
    _admit(d, [1])
    batch, _ = d.take_batch(0, 0.0)
    d.apply_plan(fixed_plan(CASCADE, 0, 1, 1, 1, threshold=1.0), 0.1)
    assert d.swap_pending[0]
    d.fail_batch(batch, 0.3, "boom")
    assert not d.swap_pending[0] and d.loaded[0] == "heavy" and d.ready_at[0] == pytest.approx(2.3)
    assert d.busy_s[0] == batch.service_s  # no measured time given: the profile's


# -- invariants on random small scenarios -----------------------------------------------------------


@st.composite
def scenarios(draw):
    gpus = draw(st.integers(1, 6))
    n = draw(st.integers(1, 60))
    horizon = draw(st.floats(0.5, 30))
    arrivals = sorted(draw(st.lists(st.floats(0, horizon), min_size=n, max_size=n)))
    prompt_ids = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    plans = []
    for _ in range(draw(st.integers(1, 4))):
        light = draw(st.integers(0, gpus))
        heavy = draw(st.integers(0, gpus - light))
        b1 = draw(st.sampled_from([1, 2, 4, 8]))
        b2 = draw(st.sampled_from([1, 2, 4]))
        if draw(st.booleans()):
            plans.append(fixed_plan(CASCADE, light, heavy, b1, b2, threshold=draw(st.sampled_from([0, 0.02, 0.2, 1]))))
        else:
            share = draw(st.sampled_from([0.0, 0.4, 1.0]))
            plans.append(fixed_plan(CASCADE, light, heavy, b1, b2, mode="split", light_share=share))
    extra = dict(
        seed=draw(st.integers(0, 3)),
        routing=draw(st.sampled_from(["random", "least-loaded"])),
        swap_s=draw(st.sampled_from([0.0, 0.5])),
        batch_timeout_s=draw(st.sampled_from([0.0, 0.2])),
        controller=ControllerConfig(replan_s=draw(st.sampled_from([1.0, 2.0, 5.0]))),
        fallback=draw(st.sampled_from(["none", "light"])),
    )
    return gpus, arrivals, prompt_ids, plans, extra


def check_invariants(r, batches, enqueues, n):
    queries = r.queries
    if r.config.fallback == "light":
        # batch times are the estimates' (p50): a heavy batch a deferred query runs in ends by its deadline
        assert not any(q.deferred and q.served_by == "heavy" and q.late for q in queries)
    else:
        assert not any(q.deferred and q.served_by == "light" for q in queries)
    # Every arrival ends exactly once (Query.finish refuses a second outcome).
    assert len(queries) == n and [q.id for q in queries] == list(range(n))
    assert all(q.outcome in ("completed", "dropped") for q in queries)
    for q in queries:
        if q.outcome == "completed":
            assert q.latency_s >= q.service_s - EPS
            assert q.latency_s == pytest.approx(q.queue_s + q.service_s, abs=1e-6)
            assert q.latency_s <= LIMIT + EPS  # the drop rule: never started a batch it could not finish
            assert q.served_by == q.stages[-1]
        assert q.finished_s >= q.arrival_s
    # Batches never exceed the plan's batch size; queries in a batch had been queued at that worker.
    for b, ids, _ in batches:
        assert 1 <= len(ids) <= b.batch_size
    # Per-worker FIFO: each worker starts queries in the order they were routed to it.
    order = defaultdict(dict)  # worker -> (query id, stage index) -> position of its latest routing there
    for i, (w, key, _) in enumerate(enqueues):
        order[w][key] = i
    for w in order:
        started = [order[w][(qid, stage)] for b, ids, stages in batches if b.worker == w
                   for qid, stage in zip(ids, stages)]
        assert started == sorted(started)
    assert max(r.worker_busy_s) <= r.duration_s + EPS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants_with_scripted_plans(scenario):
    gpus, arrivals, prompt_ids, plans, extra = scenario
    r, batches, enqueues = run(ScriptedPolicy(plans), arrivals, gpus=gpus, prompt_ids=prompt_ids, hooks=True, **extra)
    check_invariants(r, batches, enqueues, len(arrivals))
    # Same config and seed: identical per-query records, plans and demand.
    r2 = run(ScriptedPolicy(plans), arrivals, gpus=gpus, prompt_ids=prompt_ids, **extra)
    assert r2.queries == r.queries
    assert r2.plans == r.plans and r2.demand == r.demand and r2.worker_busy_s == r.worker_busy_s


def real_policy_names():
    try:
        from diffsim.policies import POLICY_NAMES
    except ImportError:
        return []
    return list(POLICY_NAMES)


@pytest.mark.parametrize("policy", real_policy_names())
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 8), st.integers(0, 2**16), st.floats(1, 30))
def test_invariants_with_real_policies(policy, gpus, seed, rate):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 150))
    arrivals = np.sort(rng.uniform(0, n / rate, n))
    config = SimConfig(cascade=CASCADE, gpus=gpus, policy=policy, seed=seed % 5,
                       fallback="light" if seed % 2 else "none", routing="random" if seed % 3 else "least-loaded",
                       queue_model="tail" if seed % 4 < 2 else None)
    batches, enqueues = [], []
    r = simulate(
        config, trace_of(arrivals, rng.integers(1, 5000, n)),
        on_batch=lambda b: batches.append((b, [q.id for q in b.queries], [len(q.stages) - 1 for q in b.queries])),
        on_enqueue=lambda w, q, now: enqueues.append((w, (q.id, len(q.stages)), now)),
    )
    check_invariants(r, batches, enqueues, n)


# -- streaming: compact records, queries handed on in trace order, the collector restored ------------------


@pytest.mark.parametrize("extra", [
    dict(),
    dict(admission=True, deadline_sweep_s=0.1, service_time="sampled", swap_s=0.5),
])
def test_streamed_run_hands_on_every_query_in_order_and_keeps_the_same_records(extra):
    import gc

    from diffsim.reports.metrics import QueryRecords

    rng = np.random.default_rng(2)
    n = 3000
    trace = trace_of(np.sort(rng.uniform(0, 60, n)), rng.integers(1, 5000, n))
    config = SimConfig(cascade=CASCADE, gpus=6, routing="least-loaded", **extra)
    thresholds = gc.get_threshold()
    full = simulate(config, trace)
    seen = []

    def on_query(q):
        assert q.outcome is not None  # handed on only once ended
        seen.append(q)

    streamed = simulate(config, trace, keep_queries=False, on_query=on_query)
    assert gc.get_threshold() == thresholds
    assert [q.id for q in seen] == list(range(n)) and seen == full.queries
    assert isinstance(streamed.queries, QueryRecords) and len(streamed.queries) == n
    expected = QueryRecords.of(full.queries)
    assert np.array_equal(streamed.queries.flags, expected.flags)
    assert np.array_equal(streamed.queries.arrival_s, expected.arrival_s)
    assert np.array_equal(streamed.queries.finished_s, expected.finished_s)
    assert streamed.events == full.events and streamed.plans == full.plans and streamed.demand == full.demand


def test_trace_read_in_blocks_keeps_same_time_arrivals_together(monkeypatch):
    """Arrivals at one instant are admitted together even when a block boundary splits them."""
    import diffsim.simulator as simulator

    plan = fixed_plan(CASCADE, 4, 4, 4, 2, threshold=0.1)
    arrivals = sorted([0.5] * 7 + [1.25] * 5 + list(np.linspace(2, 9, 23)) + [9.5] * 6)
    whole = run(plan, arrivals, gpus=8)
    monkeypatch.setattr(simulator, "_TRACE_BLOCK", 3)
    blocks = run(plan, arrivals, gpus=8)
    assert blocks.queries == whole.queries and blocks.events == whole.events


# -- idle time (issue 14): the controller does not tick through empty stretches ------------------------


class CountingPolicy:
    """The shipped diffserve policy, with its calls counted."""

    name = "diffserve"

    def __init__(self, cascade=CASCADE):
        from diffsim.policies import make_policy

        self.inner = make_policy("diffserve", cascade)
        self.reads_peak_demand = self.inner.reads_peak_demand
        self.calls = 0

    def plan(self, inp):
        self.calls += 1
        return self.inner.plan(inp)


def bursts_with_gaps(gaps, per_burst=40, seed=0):
    """Bursts of Poisson arrivals at ~20 qps separated by the given idle gaps (seconds)."""
    rng = np.random.default_rng(seed)
    t, times = 0.3, []
    for gap in list(gaps) + [0.0]:
        burst = t + np.cumsum(rng.exponential(1 / 20, per_burst))
        times.extend(burst.tolist())
        t = burst[-1] + gap
    return trace_of(times, rng.integers(1, 5000, len(times)))


def outputs(result):
    from diffsim.reports.metrics import query_line

    return ([query_line(q) for q in result.queries], result.plans, result.demand, result.worker_busy_s,
            result.duration_s, result.faults)


IDLE_CASES = {
    "default": {},
    "random routing, in-system demand": dict(routing="random", controller=ControllerConfig(demand="in-system",
                                                                                          headroom=1.2)),
    "swaps and a batching timeout": dict(swap_s=0.4, batch_timeout_s=0.05),
    "tick 0.1 s, re-plan 0.25 s": dict(controller=ControllerConfig(tick_s=0.1, replan_s=0.25)),
    "tick 0.7 s, window 3": dict(controller=ControllerConfig(tick_s=0.7, replan_s=3.5, ewma_window=3)),
    "faults in a gap": dict(faults=(WorkerFault(300.0, (0, 1)), WorkerFault(377.7, (0, 1), recover=True))),
    "sampled times, admission": dict(service_time="sampled", admission=True, seed=5),
}


@pytest.mark.parametrize("case", sorted(IDLE_CASES))
def test_skipping_idle_ticks_gives_what_ticking_through_them_gives(case):
    """Idle stretches taken at once give the same queries, plans (each re-plan, at its time) and demand
    rows as a run that ticks through them one by one, with fewer events."""
    trace = bursts_with_gaps([120.0, 33.3, 0.9, 400.0, 61.7])
    config = SimConfig(cascade=CASCADE, gpus=8, **IDLE_CASES[case])
    skipping = simulate(config, trace, policy=CountingPolicy())
    ticking = simulate(config, trace, policy=CountingPolicy(), skip_idle=False)
    assert outputs(skipping) == outputs(ticking)
    assert len(skipping.demand) == len(ticking.demand) > 600
    assert skipping.events < ticking.events - 300


def test_idle_ticks_taken_at_once_with_a_policy_that_reads_the_stabilisation_window():
    """Tail planning with its hysteresis reads the controller's window of past demand: idle re-plans are
    taken at once only after the busy demands left it, and the run is the one ticking through gives."""
    from diffsim.policies import policy_for

    trace = bursts_with_gaps([120.0, 33.3, 0.9, 400.0, 61.7])
    config = SimConfig(cascade=CASCADE, gpus=8, queue_model="tail", routing="random", max_utilization=1.0,
                       controller=ControllerConfig(stabilization_s=20.0))
    assert policy_for(config).reads_peak_demand
    skipping = simulate(config, trace)
    ticking = simulate(config, trace, skip_idle=False)
    assert outputs(skipping) == outputs(ticking)
    assert skipping.events < ticking.events - 300


def test_idle_ticks_taken_at_once_with_no_worker_in_service_inside_the_window():
    """Every worker lost right after a burst, while its demands are still in the stabilisation window,
    and back just before the next: with no worker the controller asks nothing (so forgets nothing) and
    idle ticks are still taken at once, with the run ticking through them gives."""
    trace = bursts_with_gaps([3000.0], per_burst=40)
    faults = (WorkerFault(4.0, (0, 1)), WorkerFault(2900.0, (0, 1), recover=True))
    config = SimConfig(cascade=CASCADE, gpus=2, queue_model="tail", routing="random", max_utilization=1.0,
                       faults=faults)
    skipping = simulate(config, trace)
    ticking = simulate(config, trace, skip_idle=False)
    assert outputs(skipping) == outputs(ticking)
    assert skipping.events < ticking.events / 5


def test_idle_time_costs_the_same_events_and_policy_calls_however_long():
    """Two requests 10^3 s or 10^6 s apart: the same SimPy events and policy calls (the demand rows and
    re-plans of the gap are still all there)."""
    counts = {}
    for gap in (1e3, 1e6):
        policy = CountingPolicy()
        result = simulate(SimConfig(cascade=CASCADE, gpus=16), trace_of([0.5, 0.5 + gap]), policy=policy)
        assert [q.outcome for q in result.queries] == ["completed", "completed"]
        assert len(result.demand) == int(gap) + 2  # a tick a second until the second ends at gap + 2.4 s
        assert len(result.plans) == 2 + int(gap) // 5  # the first, then a re-plan every 5 s from 1 s
        counts[gap] = (result.events, policy.calls, result.policy_calls)
    assert counts[1e3] == counts[1e6]
    assert counts[1e3][0] < 200


def test_long_gaps_on_a_fractional_tick_reach_each_tick_exactly(monkeypatch):
    """With a tick of 0.1 s, one sleep over a gap longer than the run so far does not always end exactly on
    its tick's time; the controller then hops there (:func:`diffsim.simulator._exact_hops`)."""
    import diffsim.simulator as sim

    hopped = []

    def spy(k, m, tick):
        hops = sim_hops(k, m, tick)
        hopped.append(bool(hops))
        return hops

    sim_hops = sim._exact_hops
    monkeypatch.setattr(sim, "_exact_hops", spy)
    config = SimConfig(cascade=CASCADE, gpus=4, controller=ControllerConfig(tick_s=0.1, replan_s=0.5, ewma_window=4))
    for gap in np.linspace(7.0, 60.0, 12):
        trace = trace_of([0.05, 0.07, 0.05 + gap, 0.06 + gap])
        assert outputs(simulate(config, trace, policy=CountingPolicy())) == \
            outputs(simulate(config, trace, policy=CountingPolicy(), skip_idle=False))
    assert any(hopped) and len(hopped) == 12


def test_exact_hops_land_on_the_tick_times():
    from diffsim.simulator import _exact_hops, _first_tick_at_or_after

    assert _exact_hops(30, 100_001, 1.0) == []
    tick = 0.1
    hops = _exact_hops(34, 238, tick)
    assert hops == [68]  # 3.4 + (23.8 - 3.4) is not 23.8 in floating point; 6.8 + (23.8 - 6.8) is
    now = 34 * tick
    for j in hops + [238]:
        now = now + (j * tick - now)  # what SimPy's timeout does
        assert now == j * tick
    for t in (0.05, 0.1, 0.15, 23.8, 1e5 + 0.5):
        m = _first_tick_at_or_after(t, tick)
        assert (m - 1) * tick < t <= m * tick
    assert _first_tick_at_or_after(float("inf"), tick) is None


# -- the light fallback ------------------------------------------------------------------------------------


def test_light_fallback_answers_late_deferred_queries_light_in_a_whole_run():
    """traces/dynamic.csv on 8 GPUs, the artifact's settings with tail planning: without the fallback
    deferred queries are served late; with it none is, the deferred queries that could not have their
    heavy image in time are answered light, on time, and the heavy stage is planned to its capacity (so
    more images are served heavy than under the tail plan). The same seed gives the same run."""
    from diffsim.commands.simulate import load_scenario

    def run_with(fallback):
        config, trace, _ = load_scenario({"trace": "dynamic.csv", "preset": "artifact", "queue_model": "tail",
                                          "gpus": 8, "fallback": fallback})
        return simulate(config, trace)

    plain, fb = run_with("none"), run_with("light")
    late_deferred = [q for q in plain.queries if q.deferred and q.violation]
    assert late_deferred and not any(q.deferred and q.served_by == "light" for q in plain.queries)
    fallbacks = [q for q in fb.queries if q.deferred and q.served_by == "light"]
    assert fallbacks and all(q.outcome == "completed" and not q.late for q in fallbacks)
    assert all(q.stages[-1] == "light" for q in fallbacks)
    assert not any(q.deferred and q.violation for q in fb.queries)
    heavy = lambda r: sum(q.served_by == "heavy" for q in r.queries)  # noqa: E731
    assert heavy(fb) > heavy(plain)
    again = run_with("light")
    assert again.queries == fb.queries and again.plans == fb.plans
