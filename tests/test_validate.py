"""``diffsim validate``: the comparison is computed right (by hand on known numbers), and the command runs
end to end against a small server with fixed-latency fake executors, writing what it promises."""

from __future__ import annotations

import math

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from backends.fake import FixedLatencyFactory
from diffsim import cli
from diffsim.config import ControllerConfig
from diffsim.errors import DiffsimError
from diffsim.reports.validation import FIGURES, compare
from diffsim.server.http import HttpSettings
from diffsim.server.startup import BackgroundServer, ServeOptions
from diffsim.workload.traces import Trace, write_trace


def test_errors_and_spread_by_hand():
    real = [{"throughput_qps": 10.0, "slo_violation_ratio": 0.10, "latency_p50_s": 1.0},
            {"throughput_qps": 12.0, "slo_violation_ratio": 0.16, "latency_p50_s": 1.0}]
    sim = {"throughput_qps": 11.5, "slo_violation_ratio": 0.20, "latency_p50_s": 1.2}
    c = compare(sim, real)
    assert set(c) == {f.name for f in FIGURES}
    t = c["throughput_qps"]
    assert t["error"] == pytest.approx(0.5 / 11.0) and t["spread"] == 2.0 and t["error_kind"] == "relative"
    assert t["within_spread"]  # 4.5% off, inside both the 5% tolerance and the real runs' spread (18%)
    v = c["slo_violation_ratio"]
    assert v["error"] == pytest.approx(0.07) and v["error_kind"] == "absolute"
    assert not v["within_spread"]  # 7 points off: beyond 3 points and beyond the real spread of 6
    p = c["latency_p50_s"]
    assert p["error"] == pytest.approx(0.2) and not p["within_spread"]  # 20% > 15%, the runs agree exactly
    assert c["dropped"]["error"] is None and c["dropped"]["within_spread"] is None  # nothing to compare


def test_the_profile_is_scaled_per_stage_by_the_measured_ratio():
    from diffsim.commands.validate import scaled_profile

    table = lambda ms: {"batch_sizes": [1, 2], "p50_ms": ms, "p99_ms": [v and 2 * v for v in ms]}  # noqa: E731
    profile = {"gpu": "x", "models": {"l": table([10.0, 20.0]), "h": table([100.0, None])},
               "discriminator": table([1.0, 2.0])}
    out = scaled_profile(profile, "l", "h", {"light": 1.5, "heavy": 2.0})
    assert out["models"]["l"]["p50_ms"] == [15.0, 30.0] and out["models"]["l"]["p99_ms"] == [30.0, 60.0]
    assert out["models"]["h"]["p50_ms"] == [200.0, None]
    assert out["discriminator"]["p50_ms"] == [1.5, 3.0]
    assert profile["models"]["l"]["p50_ms"] == [10.0, 20.0]  # the input is left alone


def test_request_overhead_percentiles_by_hand():
    """Client latency minus the server's queueing and batches, over the completed requests only."""
    from diffsim.commands.validate import request_overhead_ms
    from diffsim.query import Query

    def answered(gap_ms, outcome="completed"):
        q = Query(0, 0, 10.0, 2.0)
        q.queue_s, q.service_s = 0.25, 0.5
        q.finish(outcome, 10.0 + 0.75 + gap_ms / 1e3)
        return q

    gaps = list(range(1, 101))  # 1..100 ms over two runs; a dropped and a rejected one do not count
    runs = [[answered(g) for g in gaps[:60]] + [answered(5000, "dropped")],
            [answered(g) for g in gaps[60:]] + [answered(9000, "rejected")]]
    o = request_overhead_ms(runs)
    assert o["request_ms"] == pytest.approx(np.percentile(gaps, 50), abs=1e-3)  # 50.5
    assert o["request_p95_ms"] == pytest.approx(np.percentile(gaps, 95), abs=1e-3)  # 95.05
    assert o["request_p99_ms"] == pytest.approx(np.percentile(gaps, 99), abs=1e-3)  # 99.01
    assert request_overhead_ms([[]]) == {"request_ms": 0.0, "request_p95_ms": 0.0,
                                                                  "request_p99_ms": 0.0}


def answered_query(arrival_s, queue_s, run_s, served_by="light", confidence=0.5, deferred=False, gap_s=0.01):
    from diffsim.query import Query

    q = Query(0, 0, arrival_s, 2.0)
    q.queue_s, q.service_s, q.confidence, q.deferred = queue_s, run_s, confidence, deferred
    q.finish("completed", arrival_s + queue_s + run_s + gap_s, served_by)
    return q


def test_batches_are_rebuilt_from_the_answers_and_give_the_measured_spread():
    """Batch-mates share their batch's run time: grouped by it (and a start within 2 s), a run's answers
    give each batch's size and time, hence measured / profile per batch and its percentiles."""
    from diffsim.commands.validate import calibrated_profile, measured_spread, rebuilt_batches
    from diffsim.runtime.batching import service_time_s
    from sim_helpers import a100_cascade

    cascade = a100_cascade()
    queries = []
    ratios = np.linspace(0.8, 2.4, 40)  # one batch per ratio, sizes 1, 2, 4 in turn
    for i, r in enumerate(ratios):
        n = (1, 2, 4)[i % 3]
        run_s = round(r * service_time_s(cascade, "light", n, True), 6)
        queries += [answered_query(10.0 * i + 0.3 * j, 0.1, run_s, gap_s=0.05 * j) for j in range(n)]
    queries.append(answered_query(5.0, 0.1, 3.0, deferred=True))  # ran in two batches: left out
    queries.append(answered_query(6.0, 0.1, 0.5, served_by="heavy", confidence=None))
    batches = rebuilt_batches(queries, cascade)
    assert sorted(n for n, _, _, _ in batches["light"]) == sorted((1, 2, 4)[i % 3] for i in range(40))
    assert [n for n, _, _, _ in batches["heavy"]] == [1]
    spread = measured_spread(rebuilt_batches(queries, cascade))
    assert set(spread) == {"light"}  # one heavy batch is too few
    light = spread["light"]
    assert light["batches"] == 40
    for q in (50, 95, 99):
        assert light[f"p{q}"] == pytest.approx(np.percentile(ratios, q), rel=1e-4)
    # per batch size, for the sizes with 20 batches or more: none of 14 / 13 / 13 here
    assert light["sizes"] == {}
    more = [answered_query(500.0 + 10.0 * i, 0.1, round(r * service_time_s(cascade, "light", 1, True), 6))
            for i, r in enumerate(np.linspace(0.5, 0.7, 10))]  # 24 batches of 1 now
    by_size = measured_spread(rebuilt_batches(queries + more, cascade))["light"]["sizes"]
    ones = np.concatenate([ratios[0::3], np.linspace(0.5, 0.7, 10)])
    assert set(by_size) == {1} and by_size[1]["batches"] == 24
    assert by_size[1]["p50"] == pytest.approx(np.percentile(ones, 50), rel=1e-4)
    assert by_size[1]["p99"] == pytest.approx(np.percentile(ones, 99), rel=1e-4)
    profile = {"models": {"l": {"batch_sizes": [1, 2], "p50_ms": [10.0, 20.0], "p99_ms": [11.0, 22.0]},
                          "h": {"batch_sizes": [1, 2], "p50_ms": [100.0, None]}},
               "discriminator": {"batch_sizes": [1, 2], "p50_ms": [1.0, 2.0]}}
    out = calibrated_profile(profile, "l", "h", {"light": {"p50": 1.5, "p95": 2.0, "p99": 3.0}}, {"heavy": 2.0})
    assert out["models"]["l"] == {"batch_sizes": [1, 2], "p50_ms": [15.0, 30.0], "p95_ms": [20.0, 40.0],
                                  "p99_ms": [30.0, 60.0]}
    assert out["discriminator"]["p99_ms"] == [3.0, 6.0]
    assert out["models"]["h"]["p50_ms"] == [200.0, None]  # no measured spread: the server's mean ratio
    # a batch size with its own measured ratios takes them; the others the stage's
    sized = {"light": {"p50": 1.5, "p95": 2.0, "p99": 3.0, "sizes": {2: {"p50": 0.5, "p95": 1.0, "p99": 1.25}}}}
    out = calibrated_profile(profile, "l", "h", sized, {})
    assert out["models"]["l"]["p50_ms"] == [15.0, 10.0]
    assert out["models"]["l"]["p99_ms"] == [30.0, 25.0]
    assert out["discriminator"]["p95_ms"] == [2.0, 2.0]


def test_the_server_estimate_at_a_run_start_is_read_as_it_was_reported():
    from diffsim.commands.validate import start_estimate

    snapshot = {"service_time_estimate": {"factor": {"light": 3.0, "heavy": 1.2},
                                          "deviation": {"light": 0.6, "heavy": 0.3}}}
    assert start_estimate(snapshot) == snapshot["service_time_estimate"]
    assert start_estimate({}) is None  # an older server: the simulation starts from its profile
    assert start_estimate({"service_time_estimate": {"factor": {"light": 1.0}}}) is None


def test_batches_judged_by_another_profile_take_their_own_times(tmp_path):
    """validate simulates batches at a run's measured times, judged by the server's profile and its
    carried estimate: batches still take their own times, with p50 times too (the estimate is what they
    are judged by, not how long they run)."""
    from diffsim.config import SimConfig
    from diffsim.simulator import simulate
    from sim_helpers import a100_cascade

    cascade = a100_cascade()
    config = SimConfig(cascade=cascade, gpus=4, policy="diffserve", seed=0, admission=False)
    trace = Trace(arrival_s=np.arange(20) * 3.0, prompt_id=np.arange(20))  # spaced: one query per batch
    plain = simulate(config, trace)
    slow = {"factor": {"light": 2.0, "heavy": 2.0}, "deviation": {"light": 0.0, "heavy": 0.0}}
    carried = simulate(config, trace, service_estimate=slow)
    assert [q.service_s for q in carried.queries] == [q.service_s for q in plain.queries]
    assert plain.queries[-1].service_s > 0
    # judged by a profile twice as slow as the one batches run at: the same batch times
    from diffsim.profiles import load_cascade
    from diffsim.resources import profiles_dir, resolve_profile

    data = yaml.safe_load(Path(resolve_profile("a100")).read_text())
    for table in [*data["models"].values(), data["discriminator"]]:
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            if table.get(key):
                table[key] = [None if v is None else 2 * v for v in table[key]]
    (tmp_path / "doubled.yaml").write_text(yaml.safe_dump(data))
    doubled = load_cascade("sdturbo-sdv15", tmp_path / "doubled.yaml", profiles_dir() / "cascades.yaml")
    judged = simulate(config, trace, estimates_from=doubled)
    assert [q.service_s for q in judged.queries] == [q.service_s for q in plain.queries]


def test_a_carried_over_estimate_changes_what_the_simulated_server_admits():
    """A server that left its last run with a slow estimate refuses at the start of the next what a fresh
    one takes: the simulator started from that estimate does the same."""
    from diffsim.config import SimConfig
    from diffsim.simulator import simulate
    from sim_helpers import a100_cascade

    cascade = a100_cascade()
    config = SimConfig(cascade=cascade, gpus=4, policy="diffserve", seed=0, admission=True)
    trace = Trace(arrival_s=np.linspace(0.0, 2.0, 120), prompt_id=np.arange(120))
    fresh = simulate(config, trace)
    slow = simulate(config, trace, service_estimate={"factor": {"light": 3.0, "heavy": 3.0},
                                                     "deviation": {"light": 0.5, "heavy": 0.5}})
    refused = lambda r: sum(q.outcome == "rejected" for q in r.queries)  # noqa: E731
    assert refused(fresh) == 0 and refused(slow) > 30


def test_contention_factors_are_measured_from_batches_that_ran_together():
    """Batches that ran alone at 0.8x their profile time and, in pairs (two workers at once), at 1.2x:
    the fitted factors for one and two workers running stand 1.5 apart, and dividing them out leaves
    the batches' spread to the per-size calibration."""
    from diffsim.commands.validate import (batch_contention, decontended, measured_contention, measured_spread,
                                          rebuilt_batches)
    from diffsim.runtime.batching import service_time_s
    from sim_helpers import a100_cascade

    cascade = a100_cascade()
    base = service_time_s(cascade, "light", 1, True)
    queries = []
    for i in range(30):  # alone, 10 s apart
        queries.append(answered_query(10.0 * i, 0.0, round(0.8 * base, 6) + i * 1e-6))
    for i in range(30):  # two at once, on two workers (told apart by their run times)
        for j in range(2):
            queries.append(answered_query(500.0 + 10.0 * i, 0.0, round(1.2 * base, 6) + (2 * i + j) * 1e-6))
    running = batch_contention(rebuilt_batches(queries, cascade), gpus=2)
    counts = [k for k, _ in running.values()]
    assert counts.count(1) == 30 and counts.count(2) == 60  # pairs start together
    alone = [idle for k, idle in running.values() if k == 1]  # the host idle before each
    assert alone[0] == math.inf and alone[1:] == pytest.approx([10.0 - 0.8 * base] * 29, abs=1e-3)
    contention = measured_contention(rebuilt_batches(queries, cascade), gpus=2)
    f1, f2 = contention["factors"]
    assert f2 / f1 == pytest.approx(1.5, rel=1e-3)
    assert contention["batches"] == {1: 30, 2: 60}
    assert measured_contention(rebuilt_batches(queries[:30], cascade), gpus=2) is None  # one count only: nothing to fit
    # de-contended, the ratios of the batches that ran alone equal those that ran in pairs
    spread = measured_spread(decontended(rebuilt_batches(queries, cascade), contention, gpus=2))["light"]
    assert spread["p95"] / spread["p50"] < 1.6  # 1.2 / 0.8 = 1.5 would remain without it


def test_idle_factors_are_measured_from_batches_that_ran_alone():
    """Batches that ran alone: back to back (1 ms after the last ended) at 0.7x their profile time, after
    10 s of idle at 1.3x; and pairs at 1.0x. The fitted idle factors stand 1.3 / 0.7 apart, each idle class
    with its batches counted, and dividing them out leaves the alone batches' spread to the calibration."""
    from diffsim.commands.validate import (IDLE_GAPS_S, contention_fields, decontended, measured_contention,
                                          measured_spread, rebuilt_batches)
    from diffsim.profiles import BatchTimeContention
    from diffsim.runtime.batching import service_time_s
    from sim_helpers import a100_cascade

    cascade = a100_cascade()
    base = service_time_s(cascade, "light", 1, True)
    queries, t = [], 0.0
    for i in range(30):  # after idle
        queries.append(answered_query(t, 0.0, round(1.3 * base, 6) + i * 1e-6))
        t += 10.0
    for i in range(30):  # back to back
        run = round(0.7 * base, 6) + i * 1e-6
        queries.append(answered_query(t, 0.0, run))
        t += run + 0.001
    t += 10.0
    for i in range(30):  # in pairs
        for j in range(2):
            queries.append(answered_query(t, 0.0, round(base, 6) + (2 * i + j) * 1e-6))
        t += 10.0
    contention = measured_contention(rebuilt_batches(queries, cascade), gpus=2)
    assert contention["idle_gaps_s"] == list(IDLE_GAPS_S)
    assert contention["idle_batches"] == [29, 0, 0, 0, 31]  # the first back-to-back batch came after idle
    fast, slow = contention["idle_factors"][0], contention["idle_factors"][-1]
    assert slow / fast == pytest.approx(1.3 / 0.7, rel=1e-3)
    assert contention["idle_factors"][1:4] == [contention["factors"][0]] * 3  # classes with no batches
    model = BatchTimeContention(**contention_fields(contention))
    assert model.at(1, 0.001) == fast and model.at(1, 60.0) == slow and model.at(2, 0.0) == contention["factors"][1]
    spread = measured_spread(decontended(rebuilt_batches(queries, cascade), contention, gpus=2))["light"]
    assert spread["p95"] / spread["p50"] < 1.05  # 1.3 / 0.7 would remain without the idle classes


def test_contention_profile_fields_are_validated():
    from diffsim.profiles import BatchTimeContention

    ok = BatchTimeContention(factors=[0.8, 1.2], idle_gaps_s=[0.0, 0.1], idle_factors=[0.6, 1.1])
    assert (ok.at(1, 0.05), ok.at(1, 0.1), ok.at(1, math.inf), ok.at(3, 0.0)) == (0.6, 1.1, 1.1, 1.2)
    assert BatchTimeContention(factors=[0.8, 1.2]).at(1, 5.0) == 0.8  # no idle classes: the count's factor
    for bad, words in [
        (dict(factors=[1.0], idle_gaps_s=[0.0]), "go together"),
        (dict(factors=[1.0], idle_gaps_s=[0.1, 0.2], idle_factors=[1.0, 1.0]), "start at 0"),
        (dict(factors=[1.0], idle_gaps_s=[0.0, 0.0], idle_factors=[1.0, 1.0]), "increase"),
        (dict(factors=[1.0], idle_gaps_s=[0.0, 0.2], idle_factors=[1.0]), "one value per idle gap"),
        (dict(factors=[1.0], idle_gaps_s=[0.0], idle_factors=[0.0]), "must lie in"),
    ]:
        with pytest.raises(ValueError, match=words):
            BatchTimeContention(**bad)


def _described_a100() -> dict:
    """What GET /v1/config says of a 2-worker diffserve server on the A100 profile (no server started)."""
    from test_engine import FakeWorker

    from diffsim.server.engine import Engine, EngineConfig
    from sim_helpers import a100_cascade

    return Engine(EngineConfig(cascade=a100_cascade(), gpus=2, policy="diffserve"), [FakeWorker(0), FakeWorker(1)]).describe()


def test_the_simulator_scales_batches_that_run_alone_by_the_host_s_idle_time():
    """One worker: the first batch after idle (2x), the next back to back (0.5x), one after 9.75 s (2x);
    and the idle classes reach the simulation validate makes of a run."""
    import dataclasses

    from diffsim.config import SimConfig
    from diffsim.profiles import BatchTimeContention
    from diffsim.simulator import simulate
    from sim_helpers import a100_cascade

    # idle time counted from the last batch's end: the second batch starts 0 s after the first ended
    # (0.2 s after it started, which would fall in the second class)
    contention = BatchTimeContention(factors=[1.0], idle_gaps_s=[0.0, 0.15], idle_factors=[0.5, 2.0])
    cascade = dataclasses.replace(a100_cascade(), batch_time_contention=contention)
    trace = Trace(arrival_s=np.array([0.0, 0.15, 10.0]), prompt_id=np.arange(3))
    result = simulate(SimConfig(cascade=cascade, gpus=1, policy="clipper-light", seed=0, service_time="sampled"), trace)
    assert [q.service_s for q in result.queries] == pytest.approx([0.2, 0.05, 0.2], rel=1e-12)
    # validate passes every fitted field on to the profile it simulates with
    from diffsim.commands.validate import sim_config_from

    described = json.loads(json.dumps(_described_a100()))
    fitted = {"factors": [0.8, 1.2], "idle_gaps_s": [0.0, 0.15], "idle_factors": [0.5, 2.0], "batches": {1: 40, 2: 40}}
    simulated = sim_config_from(described, service_time="sampled", contention=fitted).cascade.batch_time_contention
    assert (simulated.factors, simulated.idle_gaps_s, simulated.idle_factors) == ([0.8, 1.2], [0.0, 0.15], [0.5, 2.0])


def test_the_simulator_scales_drawn_batch_times_by_the_workers_running():
    import dataclasses

    from diffsim.config import SimConfig
    from diffsim.profiles import BatchTimeContention
    from diffsim.simulator import simulate
    from sim_helpers import a100_cascade

    cascade = dataclasses.replace(a100_cascade(), batch_time_contention=BatchTimeContention(factors=[1.0, 2.0]))
    trace = Trace(arrival_s=np.array([0.0, 0.0, 10.0]), prompt_id=np.arange(3))
    times = lambda mode: [q.service_s for q in simulate(SimConfig(  # noqa: E731
        cascade=cascade, gpus=2, policy="clipper-light", seed=0, service_time=mode), trace).queries]
    assert times("sampled") == [0.1, 0.2, 0.1]  # the second starts while the first runs; the third alone
    assert times("p50") == [0.1, 0.1, 0.1]  # the fixed-time simulator keeps the profile's times
    assert BatchTimeContention(factors=[0.8, 1.2]).at(5) == 1.2
    with pytest.raises(ValueError):
        BatchTimeContention(factors=[0.0])


def test_the_correlation_of_batch_times_is_fitted_from_the_rebuilt_batches():
    """Batches whose log time follows sqrt(share) x AR(1, rho) + sqrt(1 - share) x noise, one after the
    other: the fit finds share and rho back (loosely: a run has hundreds of batches, not millions)."""
    from diffsim.commands.validate import measured_correlation, rebuilt_batches
    from diffsim.runtime.batching import service_time_s
    from sim_helpers import a100_cascade

    cascade = a100_cascade()
    base = service_time_s(cascade, "light", 1, True)
    rng = np.random.default_rng(5)
    for share, rho in ((0.7, 0.9), (0.0, 0.0)):
        slow, queries = rng.standard_normal(), []
        for i in range(3000):
            slow = rho * slow + np.sqrt(1 - rho * rho) * rng.standard_normal()
            z = np.sqrt(share) * slow + np.sqrt(1 - share) * rng.standard_normal()
            queries.append(answered_query(3.0 * i, 0.0, round(base * np.exp(0.3 * z), 6) + i * 1e-6))
        fit = measured_correlation(rebuilt_batches(queries, cascade))
        assert fit["batches"] == 3000
        if share:
            assert fit["share"] == pytest.approx(share, abs=0.1) and fit["rho"] == pytest.approx(rho, abs=0.03)
        else:
            assert fit["share"] < 0.1  # nothing correlated: no slow spells to speak of
    assert measured_correlation(rebuilt_batches(queries[:50], cascade)) is None  # too few batches to fit
    # batch sizes in runs (as the load goes) with a profile whose shape across sizes is off: no slow spell
    queries = []
    for i in range(3000):
        n = 4 if (i // 50) % 2 else 1
        ratio = (0.5 if n == 4 else 1.0) * np.exp(0.3 * rng.standard_normal())
        run_s = round(ratio * service_time_s(cascade, "light", n, True), 6) + i * 1e-6
        queries += [answered_query(3.0 * i, 0.0, run_s) for _ in range(n)]
    assert measured_correlation(rebuilt_batches(queries, cascade))["share"] < 0.1


def test_a_run_s_mean_ratio_from_the_server_s_running_means_and_counts():
    """The server reports its mean measured / profile batch time since it started, and /metrics how many
    batches that is: one run's mean is the difference of the sums."""
    from diffsim.commands.validate import run_ratio

    before = {"light": (2.0, 100.0), "heavy": (1.5, 10.0)}
    after = {"light": (1.5, 300.0), "heavy": (1.5, 10.0)}
    assert run_ratio(before, after) == {"light": pytest.approx((1.5 * 300 - 2.0 * 100) / 200)}  # 1.25
    assert run_ratio({}, {"light": (1.2, 40.0)}) == {"light": 1.2}  # the server's first batches
    assert run_ratio(before, {"light": (1.5, None)}) == {"light": 1.5}  # no /metrics: the mean since start


def test_the_lead_in_puts_the_simulated_ticks_and_replans_on_the_server_s():
    from diffsim.commands.validate import lead_in_s

    controller = ControllerConfig(tick_s=1.0, replan_s=5.0)  # re-plans every 5 ticks
    for now, applied in ((103.37, 101.002), (7.9, 6.001), (1000.2, 997.0)):
        lead = lead_in_s({"now_s": now, "applied_s": applied, "controller": {"ticks": int(now)}}, controller)
        assert (controller.ewma_window + 1) <= lead < (controller.ewma_window + 1) + 5
        # simulated tick k falls at the run's k - lead; the server's tick j at j - now: the same instants
        assert (lead - now) % 1.0 == pytest.approx(0.0, abs=1e-9) or (lead - now) % 1.0 == pytest.approx(1.0)
        # the simulator re-plans at ticks 1, 6, 11, ...; the server next at round(applied) + 5, then every 5
        sim_replans = {round(k - lead + now) for k in range(1, 200, 5)}
        assert round(applied) + 5 in sim_replans and round(applied) + 10 in sim_replans
    fresh = lead_in_s({"now_s": 0.4, "applied_s": 0.0, "controller": {"ticks": 0}}, controller)
    assert round(1 - fresh + 0.4) % 5 == 1 % 5  # a server that has not ticked re-plans at its first tick
    assert lead_in_s({}, controller) == 0.0  # an older server's snapshot: no lead-in


def test_the_simulation_starts_under_the_server_s_plan():
    """An idle server's plan (made for no demand) is what the idle lead-in ends under; a server still
    planning for an earlier trace's demand is started from that demand instead, without a lead-in."""
    from diffsim.commands.validate import _plan_key, lead_in_s, start_state
    from diffsim.config import SimConfig
    from sim_helpers import a100_cascade
    from test_worker_loss import poisson_trace

    config = SimConfig(cascade=a100_cascade(), gpus=8, seed=0)
    trace = poisson_trace(5.0, 20.0, seed=2)
    idle = start_state(config, trace, None, {"now_s": 300.2, "applied_s": 297.0, "controller": {"ticks": 300}})
    assert idle[1:] == (lead_in_s({"now_s": 300.2, "applied_s": 297.0, "controller": {"ticks": 300}},
                                  config.controller), "idle lead-in", None)  # no plan in the snapshot: as idle
    from diffsim.commands.validate import simulate_run

    idle_plan = simulate_run(config, trace, None, idle[1]).plans[0][1]
    snapshot = {"now_s": 300.2, "applied_s": 297.0, "controller": {"ticks": 300, "demand_qps": 0.0},
                "plan": idle_plan.to_dict()}
    assert start_state(config, trace, None, snapshot)[2] == "idle lead-in"
    from diffsim.policies import PolicyInput, policy_for

    busy_plan = policy_for(config).plan(PolicyInput(demand_qps=40.0, queue_delay_s=(0.0, 0.0), gpus=8))
    assert _plan_key(busy_plan) != _plan_key(idle_plan)
    busy = {**snapshot, "plan": busy_plan.to_dict(), "controller": {"ticks": 300, "demand_qps": 40.0}}
    started, lead, how, state = start_state(config, trace, None, busy)
    assert state is None  # an older server, without its controller's state
    assert (lead, how) == (0.0, "the server's plan and demand estimate")
    assert started.controller.initial_demand_qps == pytest.approx(40.0 / config.controller.headroom)
    assert _plan_key(simulate_run(started, trace, None, 0.0).plans[0][1]) == _plan_key(busy_plan)


def test_the_simulation_takes_up_the_server_s_controller_state():
    """A server that reports its controller's state: the simulation resumes it after a lead-in of the
    server's tick phase, so its ticks fall on the server's and its next re-plan where the server's falls
    (replan_s after the plan in force was made, not at the first tick), under the server's plan."""
    from diffsim.commands.validate import start_state
    from diffsim.config import SimConfig
    from diffsim.policies import PolicyInput, policy_for
    from diffsim.runtime.controller import Controller
    from sim_helpers import a100_cascade
    from test_worker_loss import poisson_trace

    config = SimConfig(cascade=a100_cascade(), gpus=8, seed=0)
    trace = poisson_trace(5.0, 20.0, seed=2)
    server = Controller(policy_for(config), 8, config.controller)  # ticks 1 s, re-plans every 5 s
    server.initial_plan(0.0)
    for k in range(1, 13):  # the server's last re-plan at tick 11 (ticks 1, 6, 11)
        server.on_tick(k + 0.004, 30, (2, 0), (30.0, 0.0), in_system=5)
    assert server.last_plan_s == pytest.approx(11.004)
    # the state as tick 12 (at 12.004) left it; the run starts at the server's 12.3
    snapshot = {"now_s": 12.3, "plan": server.plan.to_dict(),
                "controller": {"state": server.state(12.004), "state_at_s": 12.004}}
    _, lead, how, state = start_state(config, trace, None, snapshot)
    assert how == "the server's controller state" and lead == pytest.approx(0.296)
    from diffsim.commands.validate import simulate_run

    sim = simulate_run(config, trace, None, lead, controller_state=state)
    assert sim.plans[0][1] == server.plan  # the server's plan, not one made for the sim's initial demand
    # the server's next ticks at 13.004, 14.004, ... are the run's 0.704, 1.704, ...; its next re-plan at
    # tick 16 (11.004 + 5 - half a tick of tolerance), the run's 3.704
    assert [round(t, 6) for t, _, _ in sim.demand[:3]] == [0.704, 1.704, 2.704]
    assert round(sim.plans[1][0], 6) == 3.704
    with pytest.raises(DiffsimError, match="lacks a time"):
        start_state(config, trace, None, {**snapshot, "controller": {"state": server.state(12.004)}})


def test_a_resumed_controller_goes_on_as_the_one_it_was_taken_from():
    from diffsim.config import ControllerConfig, SimConfig
    from diffsim.policies import policy_for
    from diffsim.runtime.controller import Controller
    from sim_helpers import a100_cascade

    config = SimConfig(cascade=a100_cascade(), gpus=8, seed=0)
    policy = policy_for(config)
    rng = np.random.default_rng(3)
    feed = [(int(rng.integers(0, 60)), (int(rng.integers(0, 9)), int(rng.integers(0, 4)))) for _ in range(40)]
    for demand in ("arrival", "in-system"):
        cfg = ControllerConfig(demand=demand)
        a = Controller(policy, 8, cfg)
        a.initial_plan(0.0)
        for k, (n, q) in enumerate(feed[:17], start=1):
            a.on_tick(float(k), n, q, (n, n / 4), in_system=n // 2 + q[0])
        b = Controller(policy, 8, cfg)
        assert b.resume(a.state(17.25), 100.25) == a.plan  # another clock: 100.25 there is 17.25 here
        for k, (n, q) in enumerate(feed[17:], start=18):
            pa = a.on_tick(float(k), n, q, (n, n / 4), in_system=n // 2 + q[0])
            pb = b.on_tick(k + 83.0, n, q, (n, n / 4), in_system=n // 2 + q[0])
            assert pa == pb and a.demand_qps == b.demand_qps and a.queue_delay_s == b.queue_delay_s, (demand, k)
    with pytest.raises(ValueError, match="not a controller state"):
        Controller(policy, 8).resume({"plan": a.plan.to_dict()})


def test_simulate_run_moves_the_lead_in_out_of_the_results():
    from diffsim.commands.validate import simulate_run
    from diffsim.config import SimConfig
    from sim_helpers import a100_cascade
    from test_worker_loss import poisson_trace

    config = SimConfig(cascade=a100_cascade(), gpus=4, seed=0)
    trace = poisson_trace(2.0, 30.0, seed=1)
    plain = simulate_run(config, trace, None, 0.0)
    led = simulate_run(config, trace, None, 21.5)
    assert [q.arrival_s for q in led.queries] == pytest.approx([q.arrival_s for q in plain.queries])
    assert led.plans[0][0] == 0.0 and all(t > 0 for t, _ in led.plans[1:])
    assert led.duration_s == pytest.approx(max(q.finished_s for q in led.queries))


def fake_profile(path: Path) -> Path:
    table = lambda ms: {"batch_sizes": [1, 2, 4], "p50_ms": list(ms)}  # noqa: E731
    path.write_text(yaml.safe_dump({
        "gpu": "fake", "provenance": {"source": "tests", "gpu": "fake", "date": "2024-01-01"},
        "models": {"sd-turbo": table([30, 30, 30]), "sd-v1.5": table([60, 60, 60])},
        "discriminator": table([1, 1, 1]),
    }))
    return path


def test_validate_end_to_end_on_a_fake_server(tmp_path, capsys):
    options = ServeOptions(backend="cpu-tiny", cascade="sdturbo-sdv15", gpus=2, policy="static",
                           static_plan={"threshold": 0.12, "light_workers": 1, "heavy_workers": 1,
                                        "light_batch": 2, "heavy_batch": 2},
                           gpu_profile=str(fake_profile(tmp_path / "fake.yaml")), slo_s=5.0, batch_sizes=(1, 2, 4),
                           controller=ControllerConfig(tick_s=0.5, replan_s=2.0))
    rng = np.random.default_rng(0)
    trace = Trace(arrival_s=np.sort(rng.uniform(0, 3.0, 24)), prompt_id=np.arange(24))
    write_trace(trace, tmp_path / "t.csv")
    server = BackgroundServer(options, HttpSettings(max_n=4), executor_factory=FixedLatencyFactory(0.03, 0.06))
    url = server.start()
    try:
        described = json.loads(__import__("httpx").get(f"{url}/v1/config").text)
        assert described["run"]["gpus"] == 2 and described["cascade"]["name"] == "sdturbo-sdv15"
        rc = cli.main(["validate", "--url", url, "--trace", str(tmp_path / "t.csv"), "--out", str(tmp_path / "v"),
                       "--repeats", "2", "--pause-s", "0"])
    finally:
        server.stop()
    assert rc == 0
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert report["requests"] == 24 and report["repeats"] == 2 and report["prompts_scored"] == 24
    assert len(report["runs"]) == 2
    saved = json.loads((tmp_path / "v" / "real-runs.json").read_text())["runs"]
    for run, start in zip(report["runs"], saved):
        # too few batches to rebuild: the server's mean ratio over the run's batches (the fake executors take
        # at least their profile's time)
        assert run["scaled_by_server_mean"]["light"] == run["server_mean_ratio"]["light"] > 0.9
        # taken up from the state the server's last tick left, after the time since that tick (how long that
        # is depends on the machine's speed: only how it is computed is checked)
        snap = start["server_start"]
        assert run["start"] == "the server's controller state"
        assert run["lead_in_s"] == round(max(0.0, snap["now_s"] - snap["controller"]["state_at_s"]), 3)
        assert set(run["start_estimate"]["factor"]) == {"light", "heavy"}  # the server reports its estimate
        assert sum(run["outcomes"].values()) == 24
    figs = report["figures"]
    assert set(figs) == {f.name for f in FIGURES}
    for name, e in figs.items():
        assert len(e["real"]) == 2, name
    thr = figs["throughput_qps"]
    mean = sum(thr["real"]) / 2
    assert thr["error"] == pytest.approx((thr["sim"] - mean) / mean)
    # the fake's confidences (seed / 100, seed = prompt id) reach the simulation: the same deferrals
    assert figs["deferral_fraction"]["sim"] == pytest.approx(figs["deferral_fraction"]["real"][0]) == 0.5
    for path in ("validation.png", "server.json", "real-1/summary.json", "real-2/summary.json", "sim-1/summary.json",
                 "sim-2/queries.csv", "sim-2/plans.csv", "real-runs.json", "trace.csv"):
        assert (tmp_path / "v" / path).exists(), path
    out = capsys.readouterr().out
    assert "throughput_qps" in out and "within" in out
    # the request overhead's spread, from the real runs' own records (queries.csv: client latency minus
    # the server's queueing and batches, completed requests), reaches the simulated profile
    import csv

    for k in (1, 2):  # per run, from that run's records
        gaps = [1e3 * max(0.0, float(r["latency_s"]) - float(r["queue_s"]) - float(r["service_s"]))
                for r in csv.DictReader(open(tmp_path / "v" / f"real-{k}" / "queries.csv")) if r["outcome"] == "completed"]
        overhead = report["runs"][k - 1]["request_overhead_ms"]
        for key, q in (("request_ms", 50), ("request_p95_ms", 95), ("request_p99_ms", 99)):
            assert overhead[key] == pytest.approx(np.percentile(gaps, q), abs=0.02), key
        assert 0 < overhead["request_ms"] <= overhead["request_p95_ms"] <= overhead["request_p99_ms"]
    from diffsim.commands.validate import sim_config_from

    o = sim_config_from(described, service_time="sampled", overhead=overhead).cascade.overheads
    # every run setting the server describes reaches the simulation (the light fallback too)
    assert sim_config_from(described, service_time="p50").fallback == described["run"]["fallback"] == "none"
    light = {**described, "run": {**described["run"], "fallback": "light"}}
    assert sim_config_from(light, service_time="p50").fallback == "light"
    # its controller's stabilisation window too; a server from before the window planned without one
    assert sim_config_from(described, service_time="p50").controller.stabilization_s == \
        described["run"]["controller"]["stabilization_s"] == 60.0
    older = {**described, "run": {**described["run"], "controller": {
        k: v for k, v in described["run"]["controller"].items() if k != "stabilization_s"}}}
    assert sim_config_from(older, service_time="p50").controller.stabilization_s == 0.0
    assert (o.request_ms, o.request_p95_ms, o.request_p99_ms) == tuple(overhead[k] for k in
                                                                       ("request_ms", "request_p95_ms", "request_p99_ms"))
    # The real runs are saved with what simulating them takes: --replay, with no server, makes the same
    # simulations and the same report (the live command simulates from those files too)
    capsys.readouterr()
    assert cli.main(["validate", "--replay", str(tmp_path / "v"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "validation.json").read_text())
    assert again.pop("replayed_from") == str(tmp_path / "v")
    assert again == report
    assert (tmp_path / "again" / "sim-2" / "queries.csv").read_bytes() == (tmp_path / "v" / "sim-2" / "queries.csv").read_bytes()
    assert "throughput_qps" in capsys.readouterr().out
    # a damaged saved run: one line naming the file and the row, exit 2
    import shutil

    shutil.copytree(tmp_path / "v", tmp_path / "damaged")
    rows = (tmp_path / "damaged" / "real-2" / "queries.csv").read_text().splitlines()
    rows[3] = rows[3].replace(",", ",x", 1)
    (tmp_path / "damaged" / "real-2" / "queries.csv").write_text("\n".join(rows) + "\n")
    assert cli.main(["validate", "--replay", str(tmp_path / "damaged"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "real-2/queries.csv:4: not a queries.csv row" in err and len(err.splitlines()) == 1, err
    # a damaged server state: one line naming the run
    for damage in ("since_plan_s", "factor"):
        shutil.rmtree(tmp_path / "damaged")
        shutil.copytree(tmp_path / "v", tmp_path / "damaged")
        saved = json.loads((tmp_path / "damaged" / "real-runs.json").read_text())
        start = saved["runs"][1]["server_start"]
        if damage == "since_plan_s":
            del start["controller"]["state"]["since_plan_s"]
        else:
            start["service_time_estimate"]["factor"]["light"] = -1.0
        (tmp_path / "damaged" / "real-runs.json").write_text(json.dumps(saved))
        assert cli.main(["validate", "--replay", str(tmp_path / "damaged"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "run 2: the server's state at its start cannot be taken up" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--replay", "{tmp}/nothing"], "no such file"),
    (["--url", "http://127.0.0.1:9"], "give --url and --trace"),
    (["--replay", "{tmp}", "--trace", "t.csv"], "without --url and --trace"),
    (["--replay", "{tmp}/notjson"], "cannot read it"),
])
def test_validate_bad_arguments_give_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "server.json").write_text("{not json")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli.main(["validate", *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_batch_overlapping_the_last_on_one_worker_is_not_idle():
    """With one worker a batch that starts before the last one ended (on the client's clock) is counted
    alone (at most gpus) but back to back: idle 0, not the time since the batch before."""
    from diffsim.commands.validate import batch_contention

    states = batch_contention({"light": [(1, 1.0, 0.1, 0.0), (1, 1.0, 0.1, 5.0), (1, 1.0, 0.1, 5.99)], "heavy": []}, 1)
    assert states == {("light", 0): (1, math.inf), ("light", 1): (1, 4.0), ("light", 2): (1, 0.0)}
