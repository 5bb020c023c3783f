"""The allocator with plan-dependent queueing delay (queue_model mean / tail): what the delay model changes,
what it must never do (leave queued work without a worker), and that ``little`` is the model of before."""

from __future__ import annotations

import numpy as np
import pytest

from diffsim.allocator import _Queueing, allocate
from diffsim.errors import DiffsimError
from diffsim.profiles import load_cascade
from diffsim.runtime.queueing import stage_latency_s


@pytest.fixture(scope="module")
def turbo():
    return load_cascade("sdturbo-sdv15", "profiles/a100.yaml", "profiles/cascades.yaml")


def test_little_ignores_backlog_and_routing(turbo):
    """The artifact's model reads the measured delay only: backlog and routing change nothing."""
    base = allocate(turbo, 16, 18.0, queue_delay_s=(0.2, 1.0))
    assert allocate(turbo, 16, 18.0, queue_delay_s=(0.2, 1.0), queue_model="little", backlog=(30, 40),
                    routing="random") == base


@pytest.mark.parametrize("solver", ["exact", "milp"])
def test_a_stage_with_queued_work_keeps_a_worker(turbo, solver):
    """At a demand where the best tail-aware plan defers nothing, a heavy backlog still gets heavy workers,
    and more of them the longer it is (the drain is part of the heavy stage's delay)."""
    kwargs = dict(queue_model="tail", routing="random", solver=solver)
    alone = allocate(turbo, 8, 30.0, **kwargs)
    assert alone.threshold == 0.0 and alone.heavy.workers == 0
    short = allocate(turbo, 8, 30.0, backlog=(0, 2), **kwargs)
    long = allocate(turbo, 8, 30.0, backlog=(0, 6), **kwargs)
    assert short.feasible and long.feasible
    assert short.threshold == 0.0 and short.heavy.workers >= 1
    assert long.heavy.workers > short.heavy.workers


@pytest.mark.parametrize("solver", ["exact", "milp"])
def test_a_backlog_no_plan_drains_in_time_is_planned_around(turbo, solver):
    """When the backlog alone is past the SLO under any plan, the plan is made for new arrivals with the
    congested stage still running, and says so."""
    plan = allocate(turbo, 8, 12.0, queue_model="tail", routing="random", backlog=(0, 400), solver=solver)
    assert not plan.feasible and "backlog" in plan.reason
    assert plan.heavy.workers >= 1


def test_tail_plans_leave_more_head_room_than_mean_plans(turbo):
    for gpus, demand in ((8, 12.0), (12, 18.0), (16, 24.0)):
        mean = allocate(turbo, gpus, demand, queue_model="mean", routing="random")
        tail = allocate(turbo, gpus, demand, queue_model="tail", routing="random")
        assert tail.deferral_fraction <= mean.deferral_fraction  # stricter: defers no more
        assert mean.feasible and tail.feasible


@pytest.mark.parametrize("routing", ["random", "least-loaded"])
def test_predicted_paths_are_the_queueing_model_at_the_candidates_quantile(turbo, routing):
    """The plan's stage paths are the queueing model's latency for its workers, batch size and load, at the
    quantile the candidate is planned to; together they meet the SLO."""
    demand = 20.0
    plan = allocate(turbo, 16, demand, queue_model="tail", routing=routing)
    rule_l, rule_h = _Queueing(0.99, routing, (0.0, 0.0), 0.0, 1.0).path_rules(np.array([plan.deferral_fraction]), True)
    (q,) = rule_l.quantiles
    assert rule_h.quantiles == pytest.approx([q]) and rule_l.gate is None and rule_h.wait
    light, heavy = plan.light, plan.heavy
    # the allocator plans with the fewest GPUs; the plan's stages are those before spare GPUs are spread
    path_l = stage_latency_s(demand, light.workers, light.batch_size, light.latency_s, routing=routing, quantile=q)
    path_h = stage_latency_s(demand * plan.deferral_fraction, heavy.workers, heavy.batch_size, heavy.latency_s,
                             routing=routing, quantile=q)
    assert plan.extra["stage_path_s"] == (pytest.approx(path_l), pytest.approx(path_h))
    assert path_l + path_h <= turbo.slo_s
    assert plan.predicted_latency_s == pytest.approx(path_l + path_h)


def test_tail_quantile_of_all_queries():
    """Only the deferred share pays both stages: with half deferred, p99 of all needs p98 of the deferred
    path; at least the median however little is deferred; p itself with nothing deferred or in split mode."""
    q = _Queueing(0.99, "random", (0.0, 0.0), 0.0, 1.0)
    light, heavy = q.path_rules(np.array([0.5, 1.0, 0.0, 0.01]), True)
    assert light.quantiles == pytest.approx([0.98, 0.99, 0.99, 0.5])
    assert heavy.quantiles == pytest.approx([0.98, 0.99, 0.99, 0.5])
    light, heavy = q.path_rules(np.array([0.5, 0.0]), False)
    assert light.quantiles == pytest.approx([0.99, 0.99]) and heavy.quantiles == pytest.approx([0.99, 0.99])
    light, heavy = _Queueing(None, "random", (0.0, 0.0), 0.0, 1.0).path_rules(np.array([0.5]), True)
    assert light.quantiles is None and heavy.quantiles is None


def test_fallback_rules_gate_the_light_path_and_plan_the_heavy_stage_to_capacity():
    """With a light fallback every query's SLO rests on the light path (gated at p), the deferred path is
    planned to its mean (light mean + heavy batch time), the heavy stage to its capacity (no wait); split
    mode (no light image to fall back on) is planned as without it."""
    q = _Queueing(0.99, "random", (0.0, 0.0), 0.0, 1.0, fallback=True)
    light, heavy = q.path_rules(np.array([0.5, 0.1]), True)
    assert light.quantiles is None and light.gate == pytest.approx([0.99, 0.99]) and light.wait
    assert heavy.quantiles is None and heavy.gate is None and not heavy.wait
    light, heavy = q.path_rules(np.array([0.5]), False)
    assert light.quantiles == pytest.approx([0.99]) and heavy.quantiles == pytest.approx([0.99])
    light, _ = _Queueing(None, "random", (0.0, 0.0), 0.0, 1.0, fallback=True).path_rules(np.array([0.5]), True)
    assert light.gate is None


@pytest.mark.parametrize("routing", ["random", "least-loaded"])
def test_fallback_plan_paths(turbo, routing):
    """A plan with the light fallback: its light path is the light stage's mean latency and its p99 meets the
    SLO; its heavy path is the heavy batch time alone, and the sum meets the SLO; its heavy stage carries
    the deferred load at the utilisation cap (not more)."""
    demand = 20.0
    plan = allocate(turbo, 16, demand, queue_model="tail", routing=routing, fallback="light", max_utilization=0.9)
    light, heavy = plan.light, plan.heavy
    assert plan.feasible and plan.deferral_fraction > 0
    mean_l = stage_latency_s(demand, light.workers, light.batch_size, light.latency_s, routing=routing)
    p99_l = stage_latency_s(demand, light.workers, light.batch_size, light.latency_s, routing=routing, quantile=0.99)
    assert p99_l <= turbo.slo_s
    assert plan.extra["stage_path_s"][1] == pytest.approx(heavy.latency_s)
    assert sum(plan.extra["stage_path_s"]) <= turbo.slo_s
    assert demand * plan.deferral_fraction <= 0.9 * heavy.workers * heavy.batch_size / heavy.latency_s + 1e-9
    # the allocator plans with the fewest GPUs; the light path is the mean at the plan's own light stage
    assert plan.extra["stage_path_s"][0] == pytest.approx(mean_l)


def test_fallback_defers_at_least_as_much_as_the_tail_plan(turbo):
    """Planning the heavy stage to its capacity instead of its tail never defers less (random routing, where
    a heavy worker's own queue needs a low utilisation for its tail)."""
    for gpus, demand in ((8, 12.0), (8, 30.0), (12, 18.0), (16, 24.0)):
        tail = allocate(turbo, gpus, demand, queue_model="tail", routing="random", max_utilization=1.0)
        fb = allocate(turbo, gpus, demand, queue_model="tail", routing="random", max_utilization=1.0, fallback="light")
        assert fb.feasible and fb.deferral_fraction >= tail.deferral_fraction
    assert allocate(turbo, 8, 30.0, queue_model="tail", routing="random", max_utilization=1.0,
                    fallback="light").deferral_fraction > allocate(turbo, 8, 30.0, queue_model="tail",
                                                                   routing="random", max_utilization=1.0).deferral_fraction


def test_unknown_fallback_is_refused(turbo):
    with pytest.raises(DiffsimError, match="unknown fallback 'heavy'"):
        allocate(turbo, 8, 10.0, queue_model="tail", fallback="heavy")


@pytest.mark.parametrize("name", ["sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl"])
def test_shipped_cascades_same_plan_from_both_solvers(name):
    cascade = load_cascade(name, "profiles/a100.yaml", "profiles/cascades.yaml")
    for model in ("mean", "tail"):
        for routing in ("random", "least-loaded"):
            for gpus, demand, backlog, fallback in ((8, 6.0, (0, 0), "none"), (16, 18.0, (4, 9), "none"),
                                                    (16, 30.0, (0, 25), "none"), (12, 0.0, (0, 3), "none"),
                                                    (8, 20.0, (0, 0), "light"), (16, 30.0, (3, 25), "light")):
                kwargs = dict(queue_model=model, routing=routing, backlog=backlog, max_utilization=1.0,
                              fallback=fallback)
                exact = allocate(cascade, gpus, demand, **kwargs, solver="exact")
                milp = allocate(cascade, gpus, demand, **kwargs, solver="milp")
                assert (exact.threshold, exact.gpus_used, exact.feasible) == (milp.threshold, milp.gpus_used,
                                                                              milp.feasible)
                assert exact.extra.get("summed_path_s") == pytest.approx(milp.extra.get("summed_path_s"), abs=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(queue_model="median"), "queue model"),
    (dict(queue_model="tail", backlog=(-1, 0)), "backlog"),
    (dict(queue_model="tail", routing="round-robin"), "routing"),
    (dict(queue_model="tail", tail_quantile=1.0), "tail_quantile"),
])
def test_bad_inputs_raise_clear_errors(turbo, kwargs, match):
    with pytest.raises(DiffsimError, match=match):
        allocate(turbo, 8, 10.0, **kwargs)


@pytest.mark.parametrize("model", ["mean", "tail"])
@pytest.mark.parametrize("routing", ["random", "least-loaded"])
@pytest.mark.parametrize("mode", ["cascade", "split"])
def test_pinned_workers_at_the_chosen_split_give_the_chosen_plan(turbo, model, routing, mode):
    """Pinning the worker counts the unpinned solve chose gives back its candidate and paths (the same path
    tables, read at those counts)."""
    checked = 0
    for gpus, demand, backlog in ((8, 6.0, (0, 0)), (8, 14.5, (0, 2)), (12, 25.0, (6, 4)), (16, 30.0, (0, 25)),
                                  (16, 18.0, (4, 9)), (64, 120.0, (10, 30))):
        kwargs = dict(queue_model=model, routing=routing, backlog=backlog, max_utilization=1.0, mode=mode)
        free = allocate(turbo, gpus, demand, **kwargs)
        if not free.feasible:
            continue
        checked += 1
        pinned = allocate(turbo, gpus, demand, **kwargs, workers=(free.light.workers, free.heavy.workers))
        assert pinned.feasible
        assert (pinned.threshold, pinned.light.workers, pinned.heavy.workers) == (
            free.threshold, free.light.workers, free.heavy.workers)
        assert pinned.extra["summed_path_s"] == pytest.approx(free.extra["summed_path_s"])
    assert checked >= 4


def test_pinned_workers_that_cannot_serve_are_infeasible(turbo):
    kwargs = dict(queue_model="tail", routing="random", max_utilization=1.0)
    assert not allocate(turbo, 8, 30.0, **kwargs, workers=(1, 7)).feasible  # one light worker: < 20.3 qps
    assert not allocate(turbo, 8, 10.0, backlog=(0, 3), **kwargs, workers=(8, 0)).feasible  # heavy queue, no worker
    assert not allocate(turbo, 8, 10.0, **kwargs, workers=(0, 8)).feasible  # a cascade needs the light stage
    fine = allocate(turbo, 8, 10.0, **kwargs, workers=(8, 0))
    assert fine.feasible and fine.threshold == 0.0 and fine.light.workers == 8  # nothing deferred


def test_pinned_workers_need_a_plan_dependent_model(turbo):
    with pytest.raises(DiffsimError, match="plan-dependent"):
        allocate(turbo, 8, 10.0, workers=(2, 6))
    with pytest.raises(DiffsimError, match="workers"):
        allocate(turbo, 8, 10.0, queue_model="tail", workers=(-1, 6))
