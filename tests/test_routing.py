"""Routing: uniform random and least-loaded load balancing, first stage, deferral."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sim_helpers import a100_cascade, fixed_plan

from diffsim.runtime.routing import Router, defers, first_stage


@pytest.fixture(scope="module")
def cascade():
    return a100_cascade()


def test_random_router_is_uniform_and_seeded():
    workers = [3, 5, 8, 9]
    r1 = Router("random", np.random.default_rng(7))
    r2 = Router("random", np.random.default_rng(7))
    a = [r1.choose(workers, None) for _ in range(4000)]
    b = [r2.choose(workers, None) for _ in range(4000)]
    assert a == b
    counts = Counter(a)
    assert set(counts) == set(workers)
    assert all(abs(c / 4000 - 0.25) < 0.04 for c in counts.values())
    assert a != [Router("random", np.random.default_rng(8)).choose(workers, None) for _ in range(4000)]


def test_least_loaded_picks_fewest_with_lowest_index_on_ties():
    router = Router("least-loaded", np.random.default_rng(0))
    loads = [5, 2, 7, 2, 0]
    assert router.choose([0, 1, 2, 3], loads) == 1  # 1 and 3 tie at 2: lowest index
    assert router.choose([0, 2, 4], loads) == 4
    assert router.choose([2], loads) == 2


def test_unknown_routing():
    with pytest.raises(ValueError):
        Router("round-robin", np.random.default_rng(0))


def test_cascade_mode_starts_everything_light(cascade):
    plan = fixed_plan(cascade, 4, 12, 16, 4, 0.5)
    assert {first_stage(plan, i, 0) for i in range(200)} == {"light"}


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_split_mode_sends_light_share_to_light_deterministically(cascade, share):
    plan = fixed_plan(cascade, 8, 8, 1, 1, mode="split", light_share=share)
    stages = [first_stage(plan, i, 5) for i in range(20000)]
    assert stages == [first_stage(plan, i, 5) for i in range(20000)]  # same query, same stage
    frac = stages.count("light") / len(stages)
    assert frac == pytest.approx(share, abs=0.015)


def test_split_decision_depends_on_seed(cascade):
    plan = fixed_plan(cascade, 8, 8, 1, 1, mode="split", light_share=0.5)
    a = [first_stage(plan, i, 1) for i in range(500)]
    b = [first_stage(plan, i, 2) for i in range(500)]
    assert a != b


def test_defers_below_threshold_only():
    assert defers(0.1, 0.2)
    assert not defers(0.2, 0.2)
    assert not defers(0.5, 0.2)
    assert not defers(0.0, 0.0)  # threshold 0 defers nothing
