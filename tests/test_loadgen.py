"""``diffsim load`` against a real HTTP server whose workers run fake executors (no torch): outcomes,
plan history, and reports with exactly the keys of ``diffsim simulate``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_engine import FakeExecutor

from diffsim import cli
from diffsim.workload.loadgen import _record, run_load, summary_and_rows
from diffsim.plan import Plan
from diffsim.policies import PolicyInput, make_policy
from diffsim.server.startup import BackgroundServer, ServeOptions
from diffsim.server.http import HttpSettings
from diffsim.workload.traces import Trace, write_trace

CASCADE = "sdturbo-sdv15"
GUARD_S = 60.0  # a failure guard, never a synchronisation: every wait ends on an event or an answer


def write_profile(path: Path, light_ms=(20, 25, 30), heavy_ms=(40, 50, 60), disc_ms=(2, 2, 2)) -> Path:
    table = lambda ms: {"batch_sizes": [1, 2, 4], "p50_ms": list(ms)}  # noqa: E731
    path.write_text(yaml.safe_dump({
        "gpu": "fake-gpu",
        "provenance": {"source": "test", "gpu": "fake", "date": "2024-01-01"},
        "models": {"sd-turbo": table(light_ms), "sd-v1.5": table(heavy_ms)},
        "discriminator": table(disc_ms),
    }))
    return path


def fake_server(tmp_path, *, plan, slo_s=5.0, delay_s=0.01, profile=None, gate=None, **kw) -> BackgroundServer:
    """A server of fake executors; with ``gate`` (:class:`Gate`) every batch waits at it."""
    options = ServeOptions(
        backend="cpu-tiny", cascade=CASCADE, gpus=plan["light_workers"] + plan["heavy_workers"], policy="static",
        gpu_profile=str(profile or write_profile(tmp_path / "profile.yaml")), static_plan=plan, slo_s=slo_s,
        batch_sizes=(1, 2, 4), **kw,
    )
    if gate is None:
        factory = lambda w, role, model: FakeExecutor(model, worker=1000 + w, delay_s=delay_s)  # noqa: E731
    else:
        factory = lambda w, role, model: HeldExecutor(model, 1000 + w, gate)  # noqa: E731
    return BackgroundServer(options, HttpSettings(), executor_factory=factory)


def small_trace(n=20, spacing_s=0.05) -> Trace:
    return Trace(arrival_s=[i * spacing_s for i in range(n)], prompt_id=[1 + (7 * i) % 50 for i in range(n)])


PLAN = {"threshold": 0.5, "light_workers": 1, "heavy_workers": 1, "light_batch": 4, "heavy_batch": 4}


def test_load_writes_the_same_reports_as_simulate(tmp_path, capsys):
    trace_path = tmp_path / "trace.csv"
    write_trace(small_trace(), trace_path)
    with fake_server(tmp_path, plan=PLAN) as server:
        rc = cli.main(["load", "--url", server.url, "--trace", str(trace_path), "--out", str(tmp_path / "load"),
                       "--no-plot", "--poll-s", "0.2", "--window-s", "0.5"])
    assert rc == 0
    printed = capsys.readouterr().out  # a served run has no seed and no simulator events (issue 14)
    assert f"trace {trace_path}\n" in printed and "None" not in printed and "wall time" in printed
    rc = cli.main(["simulate", "--trace", str(trace_path), "--gpus", "2", "--out", str(tmp_path / "sim"), "--no-plot",
                   "--quiet", "--window-s", "0.5"])
    assert rc == 0
    real = json.loads((tmp_path / "load" / "summary.json").read_text())
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert sorted(real) == sorted(sim)
    for name in ("timeseries.csv", "queries.csv", "plans.csv"):
        with open(tmp_path / "load" / name) as a, open(tmp_path / "sim" / name) as b:
            assert next(csv.reader(a)) == next(csv.reader(b)), name
    assert real["requests"] == 20 and real["completed"] == 20 and real["unfinished"] == 0
    assert real["policy"] == "static" and real["gpu"] == "fake-gpu" and real["slo_s"] == 5.0
    assert real["plans_applied"] >= 1 and real["threshold_mean"] == 0.5
    # deferral follows the threshold: the fake discriminator scores seed s as (s mod 100) / 100
    with open(tmp_path / "load" / "queries.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 20
    for row in rows:
        assert (row["deferred"] == "true") == (float(row["confidence"]) < 0.5)
        assert row["served_by"] == ("heavy" if row["deferred"] == "true" else "light")


class Gate:
    """``entered`` is set when a held batch starts running; the batch returns once ``release`` is set."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()


class HeldExecutor(FakeExecutor):
    """A fake executor whose batches wait at a gate the test opens: work held in flight, with no timing."""

    def __init__(self, model: str, worker: int, gate: Gate):
        super().__init__(model, worker=worker)
        self.gate = gate

    def generate(self, prompts, seeds):
        self.gate.entered.set()
        if not self.gate.release.wait(GUARD_S):
            raise RuntimeError("the test never released the held batch")
        return super().generate(prompts, seeds)


class ManualClock:
    """An engine clock that moves only when the test sets ``t``."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def engine_on_clock(monkeypatch, clock) -> None:
    """Servers started from now on in this test run their engine on ``clock`` (Engine's ``clock`` argument;
    serve itself always gives the real one)."""
    from diffsim.server import engine as engine_module

    class ClockedEngine(engine_module.Engine):
        def __init__(self, *args, **kw):
            super().__init__(*args, clock=clock, **kw)

    monkeypatch.setattr(engine_module, "Engine", ClockedEngine)


def wait_for(predicate, what: str) -> None:
    """Poll until ``predicate()`` holds; GUARD_S only turns a hang into a failure naming ``what``."""
    deadline = time.monotonic() + GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.01)


def test_rejections_and_drops_are_counted_once_each(tmp_path, monkeypatch):
    """A burst of 30 against one light worker (batch 1) whose profile says a batch takes X = 20 s, with a
    drop limit of 1.5 x 30 s = 45 s (2X <= 45 < 3X). The engine's clock stands still at 0 while the burst
    arrives and the first batch is held at a gate, so every admission decision is taken at t = 0 however
    fast the requests come: one batch running (or queued) plus one queued behind it fit (2X), a third
    would end at 3X: exactly 2 admitted and 28 refused (429). The test then moves the clock to 45 s: the
    queued one can no longer finish (45 + X > 45) and is dropped (504). The gate opens and the held one is
    answered 200. Each outcome is counted once, by the client, the server and the summary."""
    clock = ManualClock()
    engine_on_clock(monkeypatch, clock)
    gate = Gate()
    profile = write_profile(tmp_path / "slow.yaml", light_ms=(20000, 30000, 40000))
    plan = {"threshold": 0.0, "light_workers": 1, "heavy_workers": 0, "light_batch": 1, "heavy_batch": 1}
    n = 30
    server = fake_server(tmp_path, plan=plan, slo_s=30.0, profile=profile, gate=gate)
    with server, concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            load = pool.submit(asyncio.run, run_load(server.url, small_trace(n, 0.0), poll_s=0.2, timeout_s=GUARD_S))
            assert gate.entered.wait(GUARD_S), "the first batch never started"
            engine = server.engine
            wait_for(lambda: engine.pending + sum(engine.outcomes.values()) == n,
                     "every request is admitted or refused")
            assert engine.pending == 2 and engine.outcomes["rejected"] == n - 2
            clock.t = 45.0
            wait_for(lambda: engine.outcomes["dropped"] == 1, "the queued request is dropped")
        finally:
            gate.release.set()
        result = load.result(GUARD_S)
        server_outcomes = dict(engine.outcomes)
    assert server_outcomes == {"completed": 1, "dropped": 1, "failed": 0, "rejected": n - 2}
    outcomes = [q.outcome for q in result.queries]
    assert len(outcomes) == n and None not in outcomes
    assert Counter(outcomes) == {"completed": 1, "dropped": 1, "rejected": n - 2}
    assert result.status_counts == {200: 1, 504: 1, 429: n - 2} and result.client_errors == {}
    rejected = next(q for q in result.queries if q.outcome == "rejected")
    assert "HTTP 429" in rejected.error
    dropped = next(q for q in result.queries if q.outcome == "dropped")
    assert "HTTP 504" in dropped.error
    summary, rows = summary_and_rows(result, _cascade(), trace_name="burst")
    assert (summary["completed"], summary["dropped"], summary["rejected"]) == (1, 1, n - 2)
    assert summary["requests"] == n and summary["unfinished"] == 0
    assert summary["violations"] >= n - 1  # the dropped and the refused ones at least
    assert sum(r["arrivals"] for r in rows) == n


def _cascade():
    from diffsim.profiles import load_cascade
    from diffsim.resources import profiles_dir, resolve_profile

    return load_cascade(CASCADE, resolve_profile("a100"), profiles_dir() / "cascades.yaml")


def test_plan_round_trips_through_json():
    policy = make_policy("diffserve", _cascade())
    plan = policy.plan(PolicyInput(demand_qps=12.0, queue_delay_s=(0.1, 0.3), gpus=8))
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


@pytest.mark.parametrize("status, outcome", [(429, "rejected"), (503, "rejected"), (504, "dropped"),
                                             (500, "failed"), (400, "failed")])
def test_error_answers_map_to_outcomes(status, outcome):
    from diffsim.query import Query

    q = Query(0, 1, 0.0, 5.0)
    _record(q, status, {"error": {"message": "nope"}}, 1.0)
    assert q.outcome == outcome and q.error == f"HTTP {status}: nope" and not q.deferred


def test_a_completed_answer_fills_the_record():
    from diffsim.query import Query

    q = Query(0, 1, 0.0, 0.5)
    body = {"data": [{"b64_json": "", "model": "sd-v1.5", "served_by": "heavy", "confidence": 0.1,
                      "deferred": True, "queue_ms": 100.0, "run_ms": 300.0, "total_ms": 700.0}]}
    assert _record(q, 200, body, 0.7) == pytest.approx(0.7)
    assert q.outcome == "completed" and q.late and q.served_by == "heavy" and q.deferred
    assert q.stages == ["light", "heavy"] and q.queue_s == pytest.approx(0.1) and q.service_s == pytest.approx(0.3)
    # a deferred query answered with its light image (the light fallback) never ran on the heavy model
    fallback = Query(1, 2, 0.0, 0.5)
    body = {"data": [{"b64_json": "", "model": "sd-turbo", "served_by": "light", "confidence": 0.1,
                      "deferred": True, "queue_ms": 10.0, "run_ms": 30.0, "total_ms": 60.0}]}
    _record(fallback, 200, body, 0.06)
    assert fallback.served_by == "light" and fallback.deferred and fallback.stages == ["light"]


def test_an_error_answer_still_counts_what_the_server_says_of_the_query():
    """A query deferred to the heavy stage and then dropped there is a deferral, though not a 200."""
    from diffsim.query import Query

    q = Query(0, 1, 0.0, 0.5)
    body = {"error": {"message": "dropped"},
            "queries": [{"outcome": "dropped", "model": None, "served_by": None, "confidence": 0.2, "deferred": True,
                         "queue_ms": 400.0, "run_ms": 50.0, "total_ms": 800.0, "error": None}]}
    assert _record(q, 504, body, 0.8) == pytest.approx(0.8)
    assert q.outcome == "dropped" and q.deferred and q.confidence == 0.2 and q.stages == ["light", "heavy"]
    assert q.queue_s == pytest.approx(0.4) and q.error == "HTTP 504: dropped"


def test_a_200_without_an_image_or_json_is_a_failure_not_a_crash():
    from diffsim.query import Query

    for body in (None, {"data": []}, {"data": [{"model": "x"}]}, ["not", "an", "object"]):
        q = Query(0, 1, 0.0, 0.5)
        _record(q, 200, body, 0.1, "<html>")
        assert q.outcome == "failed" and "without an image" in q.error
