"""``diffsim load``'s client against a scripted ASGI server (issue 9, item 7): it keeps many requests open
at once, takes each outcome and deferral from the server's answer whatever the status, and reports the
requests it got no answer to apart from the server's outcomes. No assertion on a measured time (the
client's overhead is measured by benchmarks/bench_load_client.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
import uvicorn

from diffsim import cli
from diffsim.workload.loadgen import client_report, run_load, summary_and_rows
from diffsim.workload.traces import Trace, write_trace

GUARD_S = 60.0  # failure guard only
SNAPSHOT = {"plan": None, "plan_id": 0, "now_s": 0.0, "applied_s": 0.0, "cascade": "sdturbo-sdv15", "gpu": "fake",
            "slo_s": 5.0, "gpus": 1, "policy": "scripted", "routing": "least-loaded",
            "controller": {"ticks": 0}, "workers": {"busy_s": [0.0]}}


def record(**kw) -> dict:
    base = {"model": "sd-turbo", "served_by": "light", "confidence": 0.9, "deferred": False, "queue_ms": 1.0,
            "run_ms": 2.0, "total_ms": 3.0}
    return {**base, **kw}


class ScriptedServer:
    """uvicorn on 127.0.0.1:0, on a thread, running a raw ASGI app: ``answer(seed)`` says how to answer a
    generation request -- ``(status, body dict)``, or ``"disconnect"`` to start a response and drop the
    connection. With ``hold_until_open=N`` no generation request is answered before N are open at once."""

    def __init__(self, answer, hold_until_open: int = 0):
        self.answer = answer
        self.hold_until_open = hold_until_open
        self.open_now = 0
        self.most_open = 0
        self._all_open = None
        self._started = threading.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)  # connections made before uvicorn serves wait in the backlog: no readiness race
        self.sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, interface="asgi3", lifespan="on", log_level="critical",
                                                   access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    async def app(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._all_open = asyncio.Event()
                    await send({"type": "lifespan.startup.complete"})
                    self._started.set()
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/v1/plan":
            return await self._send(send, 200, SNAPSHOT)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            if self.open_now >= self.hold_until_open:
                self._all_open.set()
            await self._all_open.wait()
            how = self.answer(json.loads(body)["seed"])
            if how == "disconnect":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
                raise ConnectionResetError("scripted: the connection drops before the body")
            await self._send(send, *how)
        finally:
            self.open_now -= 1

    @staticmethod
    async def _send(send, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if status == 503:
            headers.append((b"retry-after", b"5"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        assert self._started.wait(GUARD_S), "the scripted server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(GUARD_S)


def mixed_answer(seed: int):
    """By seed mod 5: served light; deferred and served heavy; deferred then dropped (504); draining
    (503); the connection drops (no answer)."""
    kind = seed % 5
    if kind == 0:
        return 200, {"created": 0, "data": [record(b64_json="")]}
    if kind == 1:
        return 200, {"created": 0, "data": [record(b64_json="", model="sd-v1.5", served_by="heavy", confidence=0.1,
                                                   deferred=True)]}
    if kind == 2:
        error = {"message": "dropped", "type": "server_error", "code": "deadline_exceeded", "param": None}
        return 504, {"error": error, "queries": [record(outcome="dropped", model=None, served_by=None, confidence=0.2,
                                                        deferred=True, error=None)]}
    if kind == 3:
        return 503, {"error": {"message": "draining", "type": "server_error", "code": "unavailable", "param": None}}
    return "disconnect"


def burst(n: int) -> Trace:
    return Trace(arrival_s=[0.0] * n, prompt_id=list(range(n)))


def test_outcomes_and_deferrals_come_from_every_answer_and_client_errors_apart():
    n = 25
    with ScriptedServer(mixed_answer) as server:
        result = asyncio.run(run_load(server.url, burst(n), poll_s=0.2, timeout_s=GUARD_S))
    by_kind = {k: [q for q in result.queries if q.seed % 5 == k] for k in range(5)}
    assert result.status_counts == {200: 10, 504: 5, 503: 5}
    assert result.client_errors == {"payload": 5}
    assert [q.outcome for q in by_kind[0] + by_kind[1]] == ["completed"] * 10
    assert all(q.outcome == "dropped" and q.deferred and q.confidence == 0.2 for q in by_kind[2])
    assert all(q.outcome == "rejected" and not q.deferred for q in by_kind[3])
    assert all(q.outcome is None and q.error.startswith("client: ") for q in by_kind[4])

    summary, _ = summary_and_rows(result, _cascade(), trace_name="mixed")
    assert summary["deferred"] == 10  # five served heavy, five dropped after deferral
    assert summary["dropped"] == 5 and summary["rejected"] == 5 and summary["failed"] == 0
    assert summary["unfinished"] == 5  # no answer: not a server outcome
    assert "mean_fid_fallback_bound" not in summary  # a server without the light fallback (its /v1/plan says so)
    result.server = {**result.server, "fallback": "light"}
    with_fallback, _ = summary_and_rows(result, _cascade(), trace_name="mixed")
    assert with_fallback["mean_fid_fallback_bound"] >= with_fallback["mean_fid"]

    report = client_report(result)
    assert report["requests"] == n and report["answered"] == 20
    assert report["http_status"] == {"200": 10, "503": 5, "504": 5}
    assert report["server_outcomes"] == {"completed": 10, "dropped": 5, "failed": 0, "rejected": 5}
    assert report["client_errors"] == {"payload": 5} and "payload" in report["client_error_examples"]
    assert report["client_overhead_ms"]["n"] == 15  # the answers whose record gave the server's total_ms
    assert report["send_lag_ms"]["n"] == n


def test_the_client_keeps_hundreds_of_requests_open_at_once():
    """The server answers none until all are open: a client with a connection limit would wait forever."""
    n = 300
    with ScriptedServer(lambda seed: (200, {"created": 0, "data": [record(b64_json="")]}), hold_until_open=n) as server:
        result = asyncio.run(run_load(server.url, burst(n), poll_s=0.5, timeout_s=GUARD_S))
        most_open = server.most_open
    assert most_open == n
    assert result.status_counts == {200: n} and result.client_errors == {}


def test_load_command_writes_client_json_and_prints_client_errors_apart(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    write_trace(burst(10), trace)
    with ScriptedServer(mixed_answer) as server:
        rc = cli.main(["load", "--url", server.url, "--trace", str(trace), "--out", str(tmp_path / "out"),
                       "--no-plot", "--poll-s", "0.2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "client-side errors  payload: 2" in out and "HTTP answers        200: 4, 503: 2, 504: 2" in out
    client = json.loads((tmp_path / "out" / "client.json").read_text())
    assert client["client_errors"] == {"payload": 2} and client["answered"] == 8
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["unfinished"] == 2 and summary["deferred"] == 4


def test_an_unreachable_server_is_one_clear_line(tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    trace = tmp_path / "trace.csv"
    write_trace(burst(2), trace)
    rc = cli.main(["load", "--url", f"http://127.0.0.1:{port}", "--trace", str(trace), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the server" in err and "\n" not in err and "Traceback" not in err


def _cascade():
    from diffsim.profiles import load_cascade
    from diffsim.resources import profiles_dir, resolve_profile

    return load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Loopback only: a proxy from the environment must not see these requests."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
