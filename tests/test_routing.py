"""Routing: uniform random and least-loaded load balancing, first stage, deferral."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sim_helpers import a100_cascade, fixed_plan

from diffsim.runtime.routing import LoadIndex, Router, defers, first_stage


@pytest.fixture(scope="module")
def cascade():
    return a100_cascade()


def test_random_router_is_uniform_and_seeded():
    workers = [3, 5, 8, 9]
    r1 = Router("random", np.random.default_rng(7))
    r2 = Router("random", np.random.default_rng(7))
    a = [r1.choose(workers, None) for _ in range(4000)]
    b = [r2.choose(workers, None) for _ in range(4000)]
    assert a == b and a[:12] == [8, 9, 9, 3, 5, 9, 3, 9, 9, 5, 5, 5]  # seeded: known choices
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


def test_load_index_agrees_with_the_scan_under_random_changes():
    """The index's choice is the scan's (Router.choose) after any sequence of load and membership changes."""
    rng = np.random.default_rng(1)
    gpus = 40
    index = LoadIndex(gpus)
    loads = [0] * gpus
    scan = Router("least-loaded", np.random.default_rng(0))
    groups = {"light": [], "heavy": []}
    ties = 0
    for step in range(20000):
        r = rng.random()
        if r < 0.01 or step == 0:  # new membership: a random split, some workers in no group
            roles = rng.integers(0, 3, gpus)
            groups = {"light": [w for w in range(gpus) if roles[w] == 0], "heavy": [w for w in range(gpus) if roles[w] == 1]}
            index.set_groups(groups)
        else:
            w = int(rng.integers(gpus))
            loads[w] = max(0, loads[w] + int(rng.integers(-3, 4)))
            index.set(w, loads[w])
        assert index.load == loads
        for name, members in groups.items():
            if members:
                choice = scan.choose(members, loads)
                assert index.least_loaded(name) == choice
                ties += sum(loads[w] == loads[choice] for w in members) > 1
    assert ties > 5000  # choices among tied workers (lowest index wins), where an index can go wrong: 9,065 of 40,000


def test_load_index_heaps_stay_small():
    index = LoadIndex(3)
    index.set_groups({"light": [0, 1, 2]})
    for i in range(10000):  # no choice ever pops: only the rebuild bounds the heap
        index.set(i % 3, i)
    assert len(index._heaps["light"]) <= index._max_heap["light"] == 4 * 3 + 64
    assert index.least_loaded("light") == 1 and index.load == [9999, 9997, 9998]


def test_load_index_refuses_overlapping_groups_and_empty_ones():
    index = LoadIndex(3)
    with pytest.raises(ValueError):
        index.set_groups({"light": [0, 1], "heavy": [1, 2]})
    index.set_groups({"light": [0], "heavy": []})
    with pytest.raises(ValueError):
        index.least_loaded("heavy")


def test_unknown_routing():
    with pytest.raises(ValueError):
        Router("round-robin", np.random.default_rng(0))


def test_cascade_mode_starts_everything_light(cascade):
    plan = fixed_plan(cascade, 4, 12, 16, 4, 0.5)
    assert {first_stage(plan, i, 0) for i in range(200)} == {"light"}


@pytest.mark.parametrize("share, first", [(0.0, "H" * 20), (0.3, "LLHLHHLHHHHLHLHLHHHH"), (1.0, "L" * 20)])
def test_split_mode_sends_light_share_to_light_deterministically(cascade, share, first):
    plan = fixed_plan(cascade, 8, 8, 1, 1, mode="split", light_share=share)
    stages = [first_stage(plan, i, 5) for i in range(20000)]
    assert "".join(s[0].upper() for s in stages[:20]) == first  # a query's stage: known values, every run
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
