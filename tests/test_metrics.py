"""Metrics from hand-built query records: exact counts, ratios, percentiles, FID, windows, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsim.reports import metrics
from diffsim.plan import Plan, StagePlan
from diffsim.profiles import load_cascade
from diffsim.query import Query
from diffsim.resources import profiles_dir, resolve_profile

SLO = 5.0


@pytest.fixture(scope="module")
def cascade():
    return load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")


def make_plan(mode="cascade", light=(4, 16), heavy=(12, 4), threshold=0.02, light_share=1.0, feasible=True) -> Plan:
    return Plan(
        cascade="sdturbo-sdv15",
        mode=mode,
        stages=(
            StagePlan("light", "sd-turbo", light[0], light[1], 0.79, 80.0),
            StagePlan("heavy", "sd-v1.5", heavy[0], heavy[1], 3.68, 13.0),
        ),
        threshold=threshold,
        light_share=light_share,
        deferral_fraction=0.26,
        expected_fid=17.0,
        predicted_latency_s=4.5,
        demand_qps=20.0,
        gpus=16,
        feasible=feasible,
    )


def q(i, arrival, outcome="completed", latency=1.0, served_by="light", deferred=False, confidence=None):
    query = Query(id=i, prompt_id=i, arrival_s=arrival, slo_s=SLO, confidence=confidence)
    query.deferred = deferred
    if outcome is not None:
        query.finish(outcome, arrival + latency, served_by=served_by if outcome == "completed" else None)
    return query


def summarize(queries, plans, cascade, duration=100.0, busy=(50.0, 30.0), **kw):
    return metrics.summarize(
        queries, plans, cascade=cascade, gpus=2, worker_busy_s=list(busy), duration_s=duration, wall_s=0.5, **kw
    )


def test_counts_ratios_and_percentiles(cascade):
    queries = [
        q(0, 0.0, latency=1.0),
        q(1, 1.0, latency=2.0),
        q(2, 2.0, latency=6.0, served_by="heavy", deferred=True),  # late
        q(3, 3.0, latency=4.0, served_by="heavy", deferred=True),
        q(4, 4.0, outcome="dropped", latency=7.5),
        q(5, 5.0, outcome="failed", latency=0.1),
        q(6, 6.0, outcome="rejected", latency=0.0),
        q(7, 7.0, outcome=None),  # never ended
    ]
    s = summarize(queries, [(0.0, make_plan())], cascade)
    assert s["requests"] == 8
    assert (s["completed"], s["late"], s["on_time"]) == (4, 1, 3)
    assert (s["dropped"], s["failed"], s["rejected"], s["unfinished"]) == (1, 1, 1, 1)
    assert s["violations"] == 5  # 1 late + 4 not completed
    assert s["slo_violation_ratio"] == pytest.approx(5 / 8)
    assert s["light_served"] == 2 and s["light_fraction"] == pytest.approx(0.5)
    assert s["deferred"] == 2 and s["deferral_fraction"] == pytest.approx(2 / 8)
    assert s["latency_p50_s"] == pytest.approx(3.0)  # median of 1, 2, 4, 6
    assert s["latency_p99_s"] == pytest.approx(np.percentile([1, 2, 4, 6], 99))
    assert s["latency_max_s"] == pytest.approx(6.0)
    assert s["latency_mean_s"] == pytest.approx(13 / 4)
    assert s["gpu_utilization"] == pytest.approx(80.0 / (2 * 100.0))
    assert s["throughput_qps"] == pytest.approx(4 / 100)
    assert s["goodput_qps"] == pytest.approx(3 / 100)
    assert s["wall_s"] == 0.5
    assert s["cascade"] == "sdturbo-sdv15" and s["gpu"] == "a100" and s["slo_s"] == SLO


def test_every_query_counted_once(cascade):
    rng = np.random.default_rng(3)
    outcomes = ["completed", "dropped", "failed", "rejected", None]
    queries = [q(i, float(i) * 0.3, outcome=outcomes[rng.integers(5)], latency=float(rng.uniform(0, 9))) for i in range(200)]
    s = summarize(queries, [(0.0, make_plan())], cascade)
    parts = s["completed"] + s["dropped"] + s["failed"] + s["rejected"] + s["unfinished"]
    assert parts == s["requests"] == 200
    assert s["on_time"] + s["late"] == s["completed"]


def test_fid_cascade_reads_the_curve_at_light_fraction(cascade):
    # 4 of 10 completed served light -> r = 0.4 -> FID 16.79 on the sdturbo-sdv15 curve.
    queries = [q(i, i, served_by="light" if i < 4 else "heavy") for i in range(10)]
    s = summarize(queries, [(0.0, make_plan())], cascade)
    assert s["fid_source"] == "cascade"
    assert s["mean_fid"] == pytest.approx(16.79)
    # Between table points the curve is interpolated: r = 0.25 -> halfway between 17.33 and 16.98.
    queries = [q(i, i, served_by="light" if i < 1 else "heavy") for i in range(4)]
    assert summarize(queries, [(0.0, make_plan())], cascade)["mean_fid"] == pytest.approx((17.33 + 16.98) / 2)


def test_fid_split_uses_random_mix(cascade):
    queries = [q(i, i, served_by="light" if i < 4 else "heavy") for i in range(10)]
    s = summarize(queries, [(0.0, make_plan(mode="split", light_share=0.4))], cascade)
    assert s["fid_source"] == "random-mix"
    assert s["mean_fid"] == pytest.approx(cascade.random_mix_fid(0.4))
    assert s["mean_fid"] == pytest.approx(18.55 + (22.77 - 18.55) * 0.4)  # the straight line (no table)


def test_fid_mixed_modes_weighted_by_count(cascade):
    plans = [(0.0, make_plan()), (10.0, make_plan(mode="split", light_share=1.0))]
    queries = [q(i, float(i), served_by="light" if i % 2 else "heavy") for i in range(10)]  # cascade, r = 0.5
    queries += [q(10 + i, 20.0 + i, served_by="light") for i in range(5)]  # split, r = 1
    s = summarize(queries, plans, cascade)
    assert s["fid_source"] == "mixed"
    assert s["fid_overall_mix"] == pytest.approx((10 * cascade.fid(0.5) + 5 * cascade.random_mix_fid(1.0)) / 15)
    # Per 10 s window (by finish): q0..q8 end in [1, 10) with 4 of 9 light (cascade, FID 16.79 + 0.16 * 4/9 / 0.1
    # past r = 0.4 = 16.861111), q9 ends at 10 alone and light (22.77), the split queries end in [21, 25], all
    # light (random mix at r = 1: 22.77).
    assert s["mean_fid"] == pytest.approx((9 * 16.861111 + 1 * 22.77 + 5 * 22.77) / 15)
    # One window holding every completion: both modes in it, weighted by count, as the overall mix.
    one = summarize(queries, plans, cascade, window_s=100.0)
    assert one["mean_fid"] == pytest.approx(one["fid_overall_mix"]) == pytest.approx(s["fid_overall_mix"])


def test_windowed_fid_and_violation_mean_by_hand(cascade):
    plans = [(0.0, make_plan())]
    queries = [
        q(0, 0.0, served_by="light"),  # window 0 [0, 10): 4 arrivals, 4 completions, 1 light, 1 late
        q(1, 1.0, served_by="heavy"),
        q(2, 2.0, served_by="heavy"),
        q(3, 3.0, latency=6.0, served_by="heavy"),  # ends at 9.0, late (6 s > 5 s SLO)
        q(4, 12.0, outcome="dropped", latency=3.0),  # window 1: an arrival, a violation, no completion
        q(5, 20.0, served_by="light"),  # window 2: 2 arrivals, 2 light completions
        q(6, 21.0, served_by="light"),
        # window 3 [30, 40): nothing arrives or ends
        q(7, 41.0, latency=1.5, served_by="heavy"),  # window 4, partial: the run ends at 42.5
    ]
    s = summarize(queries, plans, cascade)
    # r = 1/4 -> halfway between 17.33 and 16.98; r = 1 -> 22.77; r = 0 -> 18.55; weights 4, 2, 1.
    assert s["mean_fid"] == pytest.approx((4 * 17.155 + 2 * 22.77 + 1 * 18.55) / 7)
    # Overall: 3 of 7 light -> 16.79 + 0.16 * (3/7 - 0.4) / 0.1.
    assert s["fid_overall_mix"] == pytest.approx(16.79 + 1.6 * (3 / 7 - 0.4))
    assert s["slo_violation_ratio"] == pytest.approx(2 / 8)
    # Windows with arrivals: 1/4, 1/1, 0/2, (window 3 has none), 0/1.
    assert s["slo_violation_window_mean"] == pytest.approx((0.25 + 1.0 + 0.0 + 0.0) / 4)
    rows = metrics.timeseries(queries, plans, [], cascade=cascade, window_s=10.0)
    assert len(rows) == 5 and rows[1]["fid"] is None and rows[3]["fid"] is None
    assert [r["fid"] for r in rows] == pytest.approx([17.155, None, 22.77, None, 18.55])


def test_windowed_fid_end_on_a_boundary(cascade):
    plans = [(0.0, make_plan())]
    queries = [q(0, 5.0, served_by="light"), q(1, 15.0, latency=4.0, served_by="light"),
               q(2, 16.0, latency=4.0, served_by="heavy")]  # the run ends at 20.0 exactly
    # Two windows; an end exactly on the boundary falls in the last: window 1 has r = 1/2 (16.95).
    assert summarize(queries, plans, cascade)["mean_fid"] == pytest.approx((22.77 + 2 * 16.95) / 3)
    # A demand sample at 25 s extends the run to a third window, which then holds q2 alone (r = 0).
    later = summarize(queries, plans, cascade, demand=[(25.0, 1.0, 1.0)])
    assert later["mean_fid"] == pytest.approx((22.77 + 22.77 + 18.55) / 3)
    with pytest.raises(Exception, match="window_s"):
        summarize(queries, plans, cascade, window_s=0.0)


def test_no_completions_gives_nulls(cascade):
    s = summarize([q(0, 0.0, outcome="dropped")], [(0.0, make_plan())], cascade)
    assert s["mean_fid"] is None and s["fid_source"] == "none"
    assert s["latency_p50_s"] is None and s["light_fraction"] is None
    assert s["slo_violation_ratio"] == 1.0
    empty = summarize([], [], cascade, duration=0.0)
    assert empty["requests"] == 0 and empty["slo_violation_ratio"] is None and empty["gpu_utilization"] is None


def test_plan_counts_and_time_weighted_means(cascade):
    plans = [
        (0.0, make_plan(threshold=0.0, light=(16, 1), heavy=(0, 1))),
        (5.0, make_plan(threshold=0.0, light=(16, 1), heavy=(0, 1))),  # same plan re-applied
        (10.0, make_plan(threshold=0.1, light=(4, 16), heavy=(12, 4), feasible=False)),
    ]
    s = summarize([q(0, 0.0)], plans, cascade, duration=40.0)
    assert s["plans_applied"] == 3
    assert s["plan_changes"] == 1
    assert s["infeasible_plans"] == 1
    assert s["threshold_mean"] == pytest.approx(0.1 * 30 / 40)
    assert s["light_workers_mean"] == pytest.approx((16 * 10 + 4 * 30) / 40)
    assert s["heavy_workers_mean"] == pytest.approx(12 * 30 / 40)


def test_timeseries_windows_and_assignment(cascade):
    plans = [(0.0, make_plan(threshold=0.0)), (12.0, make_plan(threshold=0.05, light=(6, 8)))]
    demand = [(1.0, 3.0, 3.5), (2.0, 5.0, 4.5), (11.0, 7.0, 6.0)]
    queries = [
        q(0, 1.0, latency=1.0),  # arrives w0, finishes w0
        q(1, 8.0, latency=3.0, served_by="heavy"),  # arrives w0, finishes w1
        q(2, 9.0, latency=6.0),  # arrives w0, late, finishes w1
        q(3, 15.0, outcome="dropped", latency=7.0),  # w1, dropped (ends in w2)
        q(4, 25.0, latency=0.5),  # w2
    ]
    rows = metrics.timeseries(queries, plans, demand, cascade=cascade, window_s=10.0)
    assert [r["t_start_s"] for r in rows] == [0.0, 10.0, 20.0]
    assert [r["arrivals"] for r in rows] == [3, 1, 1]
    assert [r["completions"] for r in rows] == [1, 2, 1]
    assert [r["violations"] for r in rows] == [1, 1, 0]
    assert [r["late"] for r in rows] == [1, 0, 0]
    assert [r["dropped"] for r in rows] == [0, 1, 0]
    assert rows[0]["slo_violation_ratio"] == pytest.approx(1 / 3)
    assert rows[0]["arrival_qps"] == pytest.approx(0.3)
    assert rows[1]["throughput_qps"] == pytest.approx(0.2)
    assert rows[0]["demand_estimate_qps"] == pytest.approx(4.0)
    assert rows[0]["measured_qps"] == pytest.approx(4.0)
    assert rows[1]["demand_estimate_qps"] == pytest.approx(6.0)
    assert rows[2]["demand_estimate_qps"] is None
    # Plan in force at each window's end.
    assert [r["threshold"] for r in rows] == [0.0, 0.05, 0.05]
    assert [r["light_workers"] for r in rows] == [4, 6, 6]
    assert rows[1]["light_batch_size"] == 8 and rows[1]["heavy_batch_size"] == 4
    # Window 1 served one light (q2) and one heavy (q1) image -> r = 0.5.
    assert rows[1]["light_fraction"] == pytest.approx(0.5)
    assert rows[1]["fid"] == pytest.approx(cascade.fid(0.5))
    assert rows[0]["fid"] == pytest.approx(cascade.fid(1.0))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 200),
            st.sampled_from(["completed", "dropped", "failed", "rejected", None]),
            st.floats(0, 20),
            st.booleans(),
        ),
        max_size=60,
    ),
    st.sampled_from([1.0, 3.0, 10.0, 7.5]),
)
def test_timeseries_sums_match_summary(cascade, items, window_s):
    queries = [q(i, a, outcome=o, latency=lat, served_by="light" if light else "heavy") for i, (a, o, lat, light) in enumerate(items)]
    plans = [(0.0, make_plan())]
    rows = metrics.timeseries(queries, plans, [], cascade=cascade, window_s=window_s)
    s = summarize(queries, plans, cascade, window_s=window_s)
    end = metrics.run_end_s(queries, plans, [])
    # The per-window figures are those of the time series' rows.
    done = [(r["completions"], r["fid"]) for r in rows if r["completions"]]
    assert s["mean_fid"] == (pytest.approx(sum(c * f for c, f in done) / sum(c for c, _ in done)) if done else None)
    busy = [r["slo_violation_ratio"] for r in rows if r["arrivals"]]
    assert s["slo_violation_window_mean"] == (pytest.approx(sum(busy) / len(busy)) if busy else None)
    # Windows are contiguous, start at 0 and cover the run.
    assert rows[0]["t_start_s"] == 0.0
    assert all(a["t_end_s"] == b["t_start_s"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["t_end_s"] >= end
    assert len(rows) == 1 or rows[-2]["t_end_s"] < end
    assert sum(r["arrivals"] for r in rows) == s["requests"]
    assert sum(r["completions"] for r in rows) == s["completed"]
    assert sum(r["violations"] for r in rows) == s["violations"]
    assert sum(r["dropped"] for r in rows) == s["dropped"]
    assert sum(r["light_served"] for r in rows) == s["light_served"]


def test_bad_window(cascade):
    from diffsim.errors import DiffsimError

    with pytest.raises(DiffsimError):
        metrics.timeseries([], [], [], cascade=cascade, window_s=0)


def test_write_outputs_is_stable_and_rounded(tmp_path, cascade):
    queries = [q(i, i / 3, latency=1 / 3 + i / 7, served_by="light" if i % 3 else "heavy") for i in range(30)]
    plans = [(0.0, make_plan())]
    s = summarize(queries, plans, cascade)
    rows = metrics.timeseries(queries, plans, [(1.0, 2.0, 2.1)], cascade=cascade, window_s=2.0)
    a, b = tmp_path / "a", tmp_path / "b"
    metrics.write_outputs(a, s, rows, plot=False)
    metrics.write_outputs(b, s, rows, plot=False)
    assert (a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()
    assert (a / "timeseries.csv").read_bytes() == (b / "timeseries.csv").read_bytes()
    assert not (a / "timeline.png").exists()
    text = (a / "summary.json").read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["latency_mean_s"] == round(s["latency_mean_s"], metrics.DIGITS)
    with open(a / "timeseries.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert list(table[0]) == list(metrics.TIMESERIES_COLUMNS)
    assert table[0]["plan_feasible"] == "true"
    assert table[-1]["demand_estimate_qps"] == ""  # None -> empty cell


def test_write_outputs_with_plot(tmp_path, cascade):
    queries = [q(i, i * 0.5, latency=1.0 + (i % 5), served_by="light" if i % 3 else "heavy") for i in range(80)]
    plans = [(0.0, make_plan()), (20.0, make_plan(threshold=0.08, light=(6, 8), heavy=(10, 2)))]
    s = summarize(queries, plans, cascade)
    rows = metrics.timeseries(queries, plans, [(t, 2.0, 2.1) for t in range(40)], cascade=cascade, window_s=5.0)
    metrics.write_outputs(tmp_path / "a", s, rows)
    metrics.write_outputs(tmp_path / "b", s, rows)
    png = (tmp_path / "a" / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert png == (tmp_path / "b" / "timeline.png").read_bytes()


def test_query_rows(cascade):
    rows = metrics.query_rows([q(0, 1.0, latency=2.0, confidence=0.4), q(1, 2.0, outcome=None)])
    assert rows[0]["outcome"] == "completed" and rows[0]["latency_s"] == pytest.approx(2.0)
    assert rows[1]["outcome"] == "unfinished" and rows[1]["latency_s"] is None


def test_rounded():
    assert metrics.rounded({"a": 1 / 3, "b": [float("nan"), -0.0000001], "c": True, "d": np.int64(3)}) == {
        "a": round(1 / 3, metrics.DIGITS),
        "b": [None, 0.0],
        "c": True,
        "d": 3,
    }


# -- compact records and the direct formatter agree with the per-query definitions ----------------------

awkward_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1e4),
    st.sampled_from([0.0, -0.0, 1e-7, -1e-7, 0.5e-6, 2.5e-6, 1e16, 0.1 + 0.2]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 10**12), st.integers(-5, 10**6), st.floats(0, 1e5), st.one_of(st.none(), awkward_floats),
    st.sampled_from(["completed", "dropped", "failed", "rejected", None]),
    st.sampled_from(["light", "heavy", None, "odd,role", 'say "x"']), st.booleans(),
    st.lists(st.sampled_from(["light", "heavy"]), max_size=3), st.lists(st.integers(1, 64), max_size=3),
    awkward_floats, awkward_floats, st.floats(0, 1e4),
)
def test_query_line_is_what_the_csv_module_writes(tmp_path_factory, i, prompt, arrival, confidence, outcome,
                                                  served_by, deferred, stages, sizes, queue_s, service_s, latency):
    query = Query(id=i, prompt_id=prompt, arrival_s=arrival, slo_s=SLO, confidence=confidence)
    query.deferred, query.stages, query.batch_sizes = deferred, stages, sizes
    query.queue_s, query.service_s = queue_s, service_s
    if outcome is not None:
        query.finish(outcome, arrival + latency, served_by=served_by)
    path = tmp_path_factory.mktemp("q") / "q.csv"
    metrics.write_csv(path, metrics.query_rows([query]), metrics.QUERY_COLUMNS)
    assert path.read_text().splitlines(keepends=True)[1] == metrics.query_line(query)


def test_query_csv_streams_the_same_file(tmp_path):
    queries = [q(i, i / 3, latency=1 / 3 + i / 7, served_by="light" if i % 3 else "heavy", confidence=i / 11)
               for i in range(10000)]
    queries[5].stages, queries[5].batch_sizes = ["light", "heavy"], [4, 2]
    metrics.write_csv(tmp_path / "a.csv", metrics.query_rows(queries), metrics.QUERY_COLUMNS)
    metrics.write_query_csv(tmp_path / "b.csv", queries)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def reference_summary_counts(queries, plans, cascade):
    """The summary's per-query definitions, one query at a time (what the numpy code must reproduce)."""
    counts = {name: 0 for name in metrics.OUTCOMES}
    unfinished = late = violations = deferred = light_served = 0
    latencies = []
    for x in queries:
        if x.outcome is None:
            unfinished += 1
        else:
            counts[x.outcome] += 1
        late += x.late
        violations += x.violation
        deferred += x.deferred
        if x.outcome == "completed":
            latencies.append(x.finished_s - x.arrival_s)
            light_served += x.served_by == "light"
    times = [t for t, _ in plans]
    by_mode = {"cascade": [0, 0], "split": [0, 0]}
    for x in queries:
        if x.outcome == "completed":
            plan = metrics.plan_at(plans, x.arrival_s, times)
            mode = plan.mode if plan is not None else ("cascade" if x.confidence is not None or x.deferred else "split")
            by_mode[mode][1] += 1
            by_mode[mode][0] += x.served_by == "light"
    lat = np.asarray(latencies, dtype=np.float64)
    return {**counts, "unfinished": unfinished, "late": late, "violations": violations, "deferred": deferred,
            "light_served": light_served, "by_mode": by_mode,
            "latency_mean_s": float(lat.mean()) if lat.size else None,
            "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_p99_s": float(np.percentile(lat, 99)) if lat.size else None}


def reference_windows(queries, n, window_s):
    def window(t):
        return min(n - 1, max(0, int(t // window_s)))

    arrivals, violations, completions, light = [0] * n, [0] * n, [0] * n, [0] * n
    for x in queries:
        arrivals[window(x.arrival_s)] += 1
        violations[window(x.arrival_s)] += x.violation
        if x.outcome == "completed":
            completions[window(x.finished_s)] += 1
            light[window(x.finished_s)] += x.served_by == "light"
    return arrivals, violations, completions, light


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 300), st.sampled_from(["completed", "dropped", "failed", "rejected", None]),
            st.floats(0, 12), st.booleans(), st.booleans(), st.one_of(st.none(), st.floats(0, 1)),
        ),
        max_size=80,
    ),
    st.sampled_from([0.1, 0.3, 1.0, 7.5, 10.0]),
    st.sampled_from(["cascade", "split", "mixed", "none"]),
)
def test_records_reproduce_the_per_query_definitions(cascade, items, window_s, plan_kind):
    items = sorted(items, key=lambda item: item[0])  # queries in arrival order, as in a run
    queries = []
    for i, (a, o, lat, light, deferred, conf) in enumerate(items):
        queries.append(q(i, a, outcome=o, latency=lat, served_by="light" if light else "heavy", deferred=deferred,
                         confidence=conf))
    plans = {"cascade": [(0.0, make_plan())], "split": [(0.0, make_plan(mode="split", light_share=0.4))],
             "mixed": [(0.0, make_plan()), (100.0, make_plan(mode="split", light_share=0.4)), (200.0, make_plan())],
             "none": []}[plan_kind]
    s = summarize(queries, plans, cascade)
    ref = reference_summary_counts(queries, plans, cascade)
    for key in ("completed", "dropped", "failed", "rejected", "unfinished", "late", "violations", "deferred",
                "light_served", "latency_mean_s", "latency_p50_s", "latency_p99_s"):
        assert s[key] == ref[key], key
    rec = metrics.QueryRecords.of(queries)
    assert metrics.summarize(rec, plans, cascade=cascade, gpus=2, worker_busy_s=[1.0], duration_s=100.0,
                             wall_s=0.5) == summarize(queries, plans, cascade, busy=(1.0,))
    rows = metrics.timeseries(queries, plans, [], cascade=cascade, window_s=window_s)
    assert metrics.timeseries(rec, plans, [], cascade=cascade, window_s=window_s) == rows
    arrivals, violations, completions, light = reference_windows(queries, len(rows), window_s)
    assert [r["arrivals"] for r in rows] == arrivals and [r["violations"] for r in rows] == violations
    assert [r["completions"] for r in rows] == completions and [r["light_served"] for r in rows] == light


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e7), max_size=50), st.sampled_from([0.01, 0.1, 0.3, 1.0, 7.5, 10.0, 1 / 3]))
def test_numpy_floor_division_is_pythons(times, window_s):
    """The time series puts a time in window ``t // window_s`` with numpy; that must be Python's //."""
    edges = [k * window_s for k in range(0, 40)] + [np.nextafter(k * window_s, 0) for k in range(1, 40)]
    t = np.array(times + edges, dtype=np.float64)
    assert np.floor_divide(t, window_s).tolist() == [x // window_s for x in t.tolist()]


@settings(max_examples=3000, deadline=None)
@given(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e10, 1e10),
    st.floats(1e-5, 1e-3),
    st.integers(0, 2 * 10**15).map(lambda k: k / 10**6 + 5e-7),  # halfway between two 6-decimal numbers
    st.integers(0, 2 * 10**15).map(lambda k: float(np.nextafter(k / 10**6 + 5e-7, 0))),
))
def test_float_cells_are_written_as_rounded_writes_them(v):
    assert metrics._float_text(v) == metrics._cell(v)


# -- the light fallback's FID bound -----------------------------------------------------------------------


def fallback_window(start, confident, heavy, fallbacks):
    """One 10 s window of cascade-mode completions from ``start``: ``confident`` served light (not deferred),
    ``heavy`` deferred and served heavy, ``fallbacks`` deferred and answered light."""
    kinds = [("light", False)] * confident + [("heavy", True)] * heavy + [("light", True)] * fallbacks
    return [q(start * 100 + i, start + 0.1 * i, served_by=s, deferred=d) for i, (s, d) in enumerate(kinds)]


def test_fallback_bound_only_when_the_run_has_the_fallback(cascade):
    queries = fallback_window(0.0, 6, 2, 2)
    assert "mean_fid_fallback_bound" not in summarize(queries, [(0.0, make_plan())], cascade)
    assert "mean_fid_fallback_bound" in summarize(queries, [(0.0, make_plan())], cascade, fallback=True)


def test_fallback_bound_without_fallbacks_is_mean_fid_exactly(cascade):
    # Windows at r = 0.25, 0.6 and 1: no deferred query was answered light, so nothing to correct.
    queries = fallback_window(0.0, 1, 3, 0) + fallback_window(10.0, 6, 4, 0) + fallback_window(20.0, 5, 0, 0)
    s = summarize(queries, [(0.0, make_plan())], cascade, fallback=True)
    assert s["fallback_light"] == 0
    assert s["mean_fid_fallback_bound"] == s["mean_fid"]  # the same floats, not approximately
    assert s["mean_fid"] == pytest.approx((4 * 17.155 + 10 * 17.26 + 5 * 22.77) / 19)


def test_fallback_bound_by_hand(cascade):
    # Half the deferred fell back: 6 confident light, 2 heavy, 2 fallbacks. The threshold deferred
    # d = 4/10, its mix (r = 0.6) reads 17.26; half of the deferred served light moves it halfway to the
    # all-light 22.77: 20.015. mean_fid reads the curve at the served r = 0.8: 18.86.
    half = fallback_window(0.0, 6, 2, 2)
    s = summarize(half, [(0.0, make_plan())], cascade, fallback=True)
    assert s["fallback_light"] == 2
    assert s["mean_fid"] == pytest.approx(18.86)
    assert s["mean_fid_fallback_bound"] == pytest.approx(17.26 + 0.5 * (22.77 - 17.26)) == pytest.approx(20.015)
    # Every deferred query fell back: the all-light end, whatever the threshold deferred.
    every = fallback_window(0.0, 7, 0, 3)
    assert summarize(every, [(0.0, make_plan())], cascade, fallback=True)["mean_fid_fallback_bound"] == \
        pytest.approx(cascade.fid(1.0)) == pytest.approx(22.77)
    # A quarter: 2 confident light, 6 heavy, 2 fallbacks: d = 0.8 (r = 0.2, 17.33), w = 1/4.
    quarter = fallback_window(0.0, 2, 6, 2)
    assert summarize(quarter, [(0.0, make_plan())], cascade, fallback=True)["mean_fid_fallback_bound"] == \
        pytest.approx(17.33 + 0.25 * (22.77 - 17.33))
    # Windows weigh by completions, as in mean_fid: the half case (10) and a window without fallbacks
    # at r = 0.5 (4: 16.95), and a split-mode window (2 light of 4: the random mix, untouched).
    plans = [(0.0, make_plan()), (30.0, make_plan(mode="split", light_share=0.5))]
    split = [q(900 + i, 30.0 + i, served_by="light" if i < 2 else "heavy") for i in range(4)]
    mixed = half + fallback_window(10.0, 2, 2, 0) + split
    s = summarize(mixed, plans, cascade, fallback=True)
    assert s["mean_fid_fallback_bound"] == pytest.approx(
        (10 * 20.015 + 4 * 16.95 + 4 * cascade.random_mix_fid(0.5)) / 18)
    assert s["mean_fid"] == pytest.approx((10 * 18.86 + 4 * 16.95 + 4 * cascade.random_mix_fid(0.5)) / 18)


def test_fallback_mix_fid_checks_its_counts(cascade):
    assert metrics.fallback_mix_fid(cascade, 10, 4, 0) == float(cascade.fid(0.4))
    with pytest.raises(ValueError, match="3 fallbacks among 2 served light of 10"):
        metrics.fallback_mix_fid(cascade, 10, 2, 3)


@pytest.mark.parametrize("name", ["sdturbo-sdv15", "sdxs-sdv15", "sdxlltn-sdxl"])
def test_fallback_bound_is_never_below_the_curve_on_the_shipped_cascades(name):
    """On a convex curve the chord from the threshold's mix to the all-light end lies above the curve, so
    the bound never reads better than ``mean_fid`` (the shipped curves are convex)."""
    c = load_cascade(name, resolve_profile("a100"), profiles_dir() / "cascades.yaml")
    n = 40
    for light in range(n + 1):
        for fallbacks in range(1, light + 1):
            bound = metrics.fallback_mix_fid(c, n, light, fallbacks)
            assert bound >= float(c.fid(light / n)) - 1e-12
            ends = float(c.fid((light - fallbacks) / n)), float(c.fid(1.0))  # the threshold's mix, all light
            assert min(ends) - 1e-12 <= bound <= max(ends) + 1e-12


def test_fallback_bound_in_a_simulated_run():
    """traces/dynamic.csv on 8 GPUs with the artifact's settings, tail planning and the light fallback:
    queries fall back, and the bound reads worse than mean_fid (as summary.json carries them both)."""
    from diffsim.commands.simulate import load_scenario
    from diffsim.reports.comparison import summarize_result
    from diffsim.simulator import simulate

    config, trace, name = load_scenario({"trace": "dynamic.csv", "preset": "artifact", "queue_model": "tail",
                                         "gpus": 8, "fallback": "light"})
    summary = summarize_result(simulate(config, trace), name)
    assert summary["fallback_light"] > 0
    assert summary["mean_fid_fallback_bound"] > summary["mean_fid"]
    # A window's bound lies between its threshold's mix and all light; on this curve none is worse than all light.
    assert summary["mean_fid_fallback_bound"] <= float(config.cascade.fid(1.0))
