"""A drained server stays reachable while clients keep sending (issue 9, item 6: no refused connections).

After SIGTERM the engine drains; then the socket stays open, answering 503, until no generation request
has come for ``drain_quiet_s`` (at most ``drain_max_s`` after the drain began). The rule is the pure
:func:`~diffsim.server.http.quiet_wait_s`; the end-to-end test holds the server open with a quiet period
of an hour and ends it by setting the period to 0, so nothing depends on how fast the machine is."""

from __future__ import annotations

import httpx
from test_engine import FakeExecutor
from test_loadgen import write_profile

from diffsim.server.http import HttpSettings, quiet_wait_s
from diffsim.server.startup import BackgroundServer, ServeOptions

GUARD_S = 60.0  # failure guard only
PLAN = {"threshold": 0.0, "light_workers": 1, "heavy_workers": 0, "light_batch": 1, "heavy_batch": 1}


def test_quiet_wait_rule():
    assert quiet_wait_s(None, 10.0, 2.0, 100.0) == 0.0  # no request ever: close now
    assert quiet_wait_s(9.5, 10.0, 2.0, 100.0) == 1.5  # the last one 0.5 s ago: 1.5 s more
    assert quiet_wait_s(5.0, 10.0, 2.0, 100.0) == 0.0  # quiet for 5 s already
    assert abs(quiet_wait_s(9.5, 10.0, 2.0, 10.8) - 0.8) < 1e-9  # cut at the longest drain
    assert quiet_wait_s(9.9, 11.0, 2.0, 10.8) == 0.0  # past the longest drain
    assert quiet_wait_s(10.0, 10.0, 0.0, 100.0) == 0.0  # quiet period 0: the old behaviour


def post(url: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": prompt, "seed": 7}, timeout=GUARD_S)


def test_a_drained_server_answers_503_while_clients_send_then_closes(tmp_path):
    options = ServeOptions(backend="cpu-tiny", cascade="sdturbo-sdv15", gpus=1, policy="static", static_plan=PLAN,
                           gpu_profile=str(write_profile(tmp_path / "profile.yaml")), slo_s=30.0,
                           batch_sizes=(1, 2, 4))
    server = BackgroundServer(options, HttpSettings(drain_quiet_s=3600.0, drain_max_s=7200.0),
                              executor_factory=lambda w, role, model: FakeExecutor(model, worker=3000))
    server.start()
    try:
        assert post(server.url, "before").status_code == 200
        server.drain()  # returns once new work is refused; nothing is in flight, so the engine is drained
        answers = [post(server.url, f"during {i}") for i in range(5)]
        health = httpx.get(f"{server.url}/healthz", timeout=GUARD_S)
        assert [a.status_code for a in answers] == [503] * 5
        assert all(int(a.headers["retry-after"]) >= 1 for a in answers)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert server._thread.is_alive()  # an hour's quiet period has not passed
    finally:
        if server._server is not None:
            server._server.quiet_s = 0.0  # clients have stopped: the server closes
        server.join(GUARD_S)
    assert not server._thread.is_alive() and server.error is None
