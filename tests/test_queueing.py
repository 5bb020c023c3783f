"""The plan-dependent queueing model: Erlang C by hand, the delay's shape, and its p99 against the simulator.

The check against the simulator runs one stage alone (all queries to one model, no deferral, an SLO too
long to drop anything) under Poisson arrivals at a grid of utilisations, and compares the p99 of the
stage's latency with :func:`diffsim.runtime.queueing.stage_latency_s`. The errors it allows are those the
module docstring states:

* random routing (per-worker M/D/c, c = batch size): within -15% / +35% of the measured p99 at
  utilisations 0.3 to 0.7 (the +35% is small batches at low load: eager batching runs them faster than
  the full batch the model charges);
* least-loaded routing (one shared M/D/c, c = workers x batch size): within -45% / +15%. It under-predicts:
  a query joins one worker's queue and waits for that worker's batch in flight, which a shared queue
  does not -- the reason tail-aware planning is recommended with random routing, where the model is close.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sim_helpers import FixedPolicy, a100_cascade, fixed_plan

from diffsim.config import SimConfig
from diffsim.runtime.queueing import erlang_c, stage_delay, stage_latency_s
from diffsim.simulator import simulate
from diffsim.workload.trace_generators import poisson_trace


def test_erlang_c_by_hand():
    # c = 1: the probability of waiting is the utilisation
    assert float(erlang_c(1, 0.3)) == pytest.approx(0.3, rel=1e-12)
    # c = 2, a = 1: (a^2/2! * c/(c-a)) / (1 + a + a^2/2! * c/(c-a)) = 1 / (1 + 1 + 1) = 1/3
    assert float(erlang_c(2, 1.0)) == pytest.approx(1 / 3, rel=1e-12)
    # c = 3, a = 2: (8/6 * 3) / (1 + 2 + 2 + 8/6 * 3) = 4 / 9
    assert float(erlang_c(3, 2.0)) == pytest.approx(4 / 9, rel=1e-12)
    assert float(erlang_c(4, 0.0)) == 0.0
    assert float(erlang_c(4, 4.0)) == 1.0  # no steady state: everyone waits
    # thousands of servers cost the same as one (no recursion over c)
    assert 0.0 < float(erlang_c(5000, 4900.0)) < 1.0


def test_mean_wait_is_allen_cunneen_for_md1():
    # M/D/1: C = rho and m = L / (2 (1 - rho)), so the mean wait is rho L / (2 (1 - rho)) (Pollaczek-Khinchine)
    L, rho = 2.0, 0.6
    d = float(stage_delay(rho / L, 1, 1, L, routing="random"))
    assert d == pytest.approx(rho * L / (2 * (1 - rho)), rel=1e-12)


def test_tail_wait_is_kingmans_exponential():
    L, rho, p = 2.0, 0.6, 0.99
    d = float(stage_delay(rho / L, 1, 1, L, routing="random", quantile=p))
    m = L / (2 * (1 - rho))
    assert d == pytest.approx(m * math.log(rho / (1 - p)), rel=1e-12)
    # a waiting probability below 1 - p: the quantile does not wait
    assert float(stage_delay(0.001, 1, 1, L, routing="random", quantile=p)) == 0.0


def test_backlog_drains_at_the_plans_capacity():
    # nothing arriving: the delay is the backlog over n b / L
    assert float(stage_delay(0.0, 4, 2, 2.0, backlog=12)) == pytest.approx(12 * 2.0 / 8)
    # a stage with a backlog and no worker never drains; with nothing at all it waits for nothing
    assert float(stage_delay(0.0, 0, 2, 2.0, backlog=1)) == math.inf
    assert float(stage_delay(0.0, 0, 2, 2.0)) == 0.0
    # only the backlog beyond the queue the plan holds anyway in steady state adds a drain
    lam, L = 3.0, 2.0
    held = lam * float(stage_delay(lam, 4, 2, L, routing="random"))
    assert float(stage_delay(lam, 4, 2, L, routing="random", backlog=held / 2)) == pytest.approx(held / lam)


def test_delay_falls_with_workers_and_is_infinite_at_full_load():
    n = np.arange(1, 30)
    for routing in ("random", "least-loaded"):
        for quantile in (None, 0.99):
            d = stage_delay(5.0, n, 4, 3.68, routing=routing, backlog=20, quantile=quantile)
            assert np.all(np.diff(d[np.isfinite(d)]) <= 1e-12)
    assert float(stage_delay(4 * 2 / 2.0, 4, 2, 2.0)) == math.inf  # utilisation 1


def _measured_p99(routing: str, role: str, workers: int, batch: int, rho: float, duration_s: float):
    """One stage alone at utilisation rho: (predicted p99, measured p99) of its latency."""
    cascade = dataclasses.replace(a100_cascade(), slo_s=1e4)  # nothing is dropped
    plan = fixed_plan(cascade, workers if role == "light" else 0, workers if role == "heavy" else 0, batch, batch,
                      mode="split", light_share=1.0 if role == "light" else 0.0)
    batch_s = plan.stage(role).latency_s
    rate = rho * workers * batch / batch_s
    trace = poisson_trace(rate, duration_s, seed=1)
    result = simulate(SimConfig(cascade=cascade, gpus=workers, routing=routing, seed=1), trace,
                      policy=FixedPolicy(plan))
    latency = [q.finished_s - q.arrival_s for q in result.queries if q.arrival_s > 60]  # past the start-up
    predicted = stage_latency_s(rate, workers, batch, batch_s, routing=routing, quantile=0.99)
    return predicted, float(np.percentile(latency, 99))


GRID = [("random", "heavy", 4, 2, 1500), ("random", "heavy", 4, 4, 1500), ("random", "light", 2, 8, 600),
        ("least-loaded", "heavy", 4, 4, 1500), ("least-loaded", "heavy", 4, 2, 1500)]
ERROR = {"random": (-0.15, 0.35), "least-loaded": (-0.45, 0.15)}


@pytest.mark.parametrize("routing,role,workers,batch,duration_s", GRID)
def test_predicted_p99_against_the_simulator(routing, role, workers, batch, duration_s):
    lo, hi = ERROR[routing]
    for rho in (0.3, 0.5, 0.7):
        predicted, measured = _measured_p99(routing, role, workers, batch, rho, duration_s)
        error = (predicted - measured) / measured
        assert lo <= error <= hi, \
            f"rho {rho}: predicted p99 {predicted:.2f} s, measured {measured:.2f} s ({error:+.0%})"
