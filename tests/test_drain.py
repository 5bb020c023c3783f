"""Shutdown drains (issue 9, item 6): after SIGTERM (or ``BackgroundServer.drain()``/``stop()``) the socket
stays open, new generation requests get 503 with Retry-After, /healthz answers 503 "draining", the requests
in flight are answered, and then the server stops.

Deterministic: a request is held in flight by an executor that blocks on a ``threading.Event`` the test
owns; nothing waits on a sleep. Waits have generous timeouts that only guard against a hang."""

from __future__ import annotations

import concurrent.futures
import signal
import threading

import httpx
import pytest
from test_engine import FakeExecutor
from test_loadgen import write_profile

from diffsim.server.http import HttpSettings
from diffsim.server.startup import BackgroundServer, ServeOptions

GUARD_S = 60.0  # a failure guard, never a synchronisation: every wait below ends on an event or an answer
PLAN = {"threshold": 0.0, "light_workers": 1, "heavy_workers": 0, "light_batch": 1, "heavy_batch": 1}


class Gate:
    """``entered`` is set when a held batch starts running; the batch returns once ``release`` is set."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()


class HeldExecutor(FakeExecutor):
    """A fake executor whose batches holding a prompt that starts with 'hold' wait for the gate."""

    def __init__(self, model: str, gate: Gate):
        super().__init__(model, worker=3000)
        self.gate = gate

    def generate(self, prompts, seeds):
        if any(p.startswith("hold") for p in prompts):
            self.gate.entered.set()
            if not self.gate.release.wait(GUARD_S):
                raise RuntimeError("the test never released the held batch")
        return super().generate(prompts, seeds)


def held_server(tmp_path, gate: Gate, drain_timeout_s=None) -> BackgroundServer:
    options = ServeOptions(backend="cpu-tiny", cascade="sdturbo-sdv15", gpus=1, policy="static", static_plan=PLAN,
                           gpu_profile=str(write_profile(tmp_path / "profile.yaml")), slo_s=30.0,
                           batch_sizes=(1, 2, 4))
    server = BackgroundServer(options, HttpSettings(drain_timeout_s=drain_timeout_s),
                              executor_factory=lambda w, role, model: HeldExecutor(model, gate))
    server.start()
    return server


def post(url: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": prompt, "seed": 7}, timeout=GUARD_S)


def hold_one_request(pool, server, gate) -> concurrent.futures.Future:
    """A request whose batch is running (held by the gate) when this returns."""
    held = pool.submit(post, server.url, "hold this one")
    assert gate.entered.wait(GUARD_S), "the held batch never started"
    return held


def assert_draining(url: str) -> None:
    r = post(url, "a new request while draining")
    assert r.status_code == 503
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "unavailable"
    health = httpx.get(f"{url}/healthz", timeout=GUARD_S)
    assert health.status_code == 503 and health.json()["status"] == "draining"


def test_drain_answers_503_while_the_request_in_flight_finishes(tmp_path):
    gate = Gate()
    server = held_server(tmp_path, gate)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = hold_one_request(pool, server, gate)
            server.drain(GUARD_S)
            assert_draining(server.url)
            assert not held.done()  # still in flight: the drain waits for it
            gate.release.set()
            answer = held.result(GUARD_S)
        assert answer.status_code == 200 and len(answer.json()["data"]) == 1
        server.join(GUARD_S)
    finally:
        gate.release.set()
        server.stop(GUARD_S)
    assert server.error is None
    assert server.engine.stopped and server.engine.outcomes["completed"] == 1
    with pytest.raises(httpx.TransportError):  # stopped: the socket is closed now, not before
        httpx.get(f"{server.url}/healthz", timeout=GUARD_S)


def test_sigterm_handler_starts_the_same_drain(tmp_path):
    """What uvicorn calls on SIGTERM in the main thread (here called directly: signals reach only the main
    thread): the socket stays open and the server drains instead of closing at once."""
    gate = Gate()
    server = held_server(tmp_path, gate)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = hold_one_request(pool, server, gate)
            server._server.handle_exit(signal.SIGTERM, None)
            # The handler only sets a flag; uvicorn's next tick starts the drain. Wait for what it shows.
            assert _wait_for_draining(server.url), "the server never reported draining"
            assert_draining(server.url)
            gate.release.set()
            assert held.result(GUARD_S).status_code == 200
        server.join(GUARD_S)
    finally:
        gate.release.set()
        server.stop(GUARD_S)
    assert server.error is None


def _wait_for_draining(url: str) -> bool:
    """Poll /healthz until it says draining (bounded by GUARD_S: a guard against a hang, not a timing)."""
    import time

    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/healthz", timeout=GUARD_S)
        if r.status_code == 503:
            return r.json()["status"] == "draining"
        assert r.status_code == 200 and r.json()["status"] == "ok"
    return False


def test_a_drain_that_times_out_answers_what_is_left_before_closing(tmp_path):
    """The drain timeout passes with a batch still held: its request is answered (500, the server shut down),
    with the record of its query, before the socket closes; the server stops once the batch returns."""
    gate = Gate()
    server = held_server(tmp_path, gate, drain_timeout_s=0.05)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = hold_one_request(pool, server, gate)
            server.drain(GUARD_S)
            answer = held.result(GUARD_S)  # comes once the drain timeout has passed, with the gate closed
        assert answer.status_code == 500
        body = answer.json()
        assert "shut down" in body["error"]["message"]
        (record,) = body["queries"]
        assert record["outcome"] == "failed" and record["deferred"] is False and "shut down" in record["error"]
        gate.release.set()
        server.join(GUARD_S)
    finally:
        gate.release.set()
        server.stop(GUARD_S)
    assert server.error is None


def test_stop_with_nothing_in_flight_stops(tmp_path):
    gate = Gate()
    server = held_server(tmp_path, gate)
    assert post(server.url, "a quick one").status_code == 200
    server.stop(GUARD_S)
    assert server.error is None and server.engine.stopped
