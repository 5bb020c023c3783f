"""What ``diffsim load``'s client adds to the latencies it reports, at 100 and 1,000 open requests.

A zero-latency server -- a bare ASGI app on uvicorn, in a process of its own, that holds each generation
request ``hold`` seconds on a timer (no CPU work) and reports the time it held it as ``total_ms``, as
``diffsim serve`` does -- is driven open loop at a constant rate by the real client
(:func:`diffsim.workload.loadgen.run_load`), so that ``rate x hold`` requests are open at once. For every
answer the client's latency (on its clock, from the hand-off to the connection to the parsed answer) is
set against the server's own ``total_ms``: the difference (ms) and the ratio are what the client and
the loopback HTTP add. The send lag (hand-off time minus the trace's schedule) is reported apart: it
delays a request but is not counted in its latency.

    .venv/bin/python benchmarks/bench_load_client.py                 # 100 and 1,000 open, 100 req/s
    .venv/bin/python benchmarks/bench_load_client.py --open 100 --rate 200
    .venv/bin/python benchmarks/bench_load_client.py --baseline      # also httpx as the old client used it
    .venv/bin/python benchmarks/bench_load_client.py --nagle         # server sockets without TCP_NODELAY

``--baseline`` drives the same server with ``httpx.AsyncClient`` configured as ``diffsim load`` was
before (no connection limit, 64 kept-alive connections) and with unlimited kept-alive connections, timed
the same way. ``--nagle`` serves on a socket without TCP_NODELAY, as ``diffsim serve`` did before: a
response's body then waits for the client's delayed ACK (about 40 ms) on kept-alive connections.
The numbers depend on the machine and on what else runs on it; nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SNAPSHOT = {"plan": None, "plan_id": 0, "now_s": 0.0, "applied_s": 0.0, "cascade": "sdturbo-sdv15",
            "gpu": "zero-latency", "slo_s": 60.0, "gpus": 1, "policy": "none", "routing": "none",
            "controller": {"ticks": 0}, "workers": {"busy_s": [0.0]}}


# ---------------------------------------------------------------------------------------------- server


def serve_zero_latency(port_file: str, hold_s: float, nagle: bool) -> None:
    """The server process: answers every generation request after ``hold_s`` with a fixed small body."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                done = "startup" if message["type"] == "lifespan.startup" else "shutdown"
                await send({"type": f"lifespan.{done}.complete"})
                if done == "shutdown":
                    return
        started = time.monotonic()
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/v1/plan":
            payload = SNAPSHOT
        else:
            await asyncio.sleep(hold_s)
            total_ms = (time.monotonic() - started) * 1e3
            payload = {"created": 0, "data": [{"b64_json": "", "model": "zero", "served_by": "light",
                                               "confidence": 1.0, "deferred": False, "queue_ms": 0.0,
                                               "run_ms": total_ms, "total_ms": total_ms}]}
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if not nagle:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as diffsim serve's socket
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    Path(port_file).write_text(str(sock.getsockname()[1]))
    config = uvicorn.Config(app, interface="asgi3", lifespan="on", log_level="error", access_log=False,
                            backlog=4096, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


class ServerProcess:
    def __init__(self, hold_s: float, nagle: bool, workdir: Path):
        self.port_file = workdir / f"port-{hold_s:g}-{int(nagle)}"
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.port_file), str(hold_s),
                                      str(int(nagle))])
        deadline = time.monotonic() + 60
        while not self.port_file.exists() or not self.port_file.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the zero-latency server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port_file.read_text()}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# ---------------------------------------------------------------------------------------------- clients


def diffsim_client(url: str, rate: float, n: int) -> dict:
    from diffsim.workload.loadgen import run_load
    from diffsim.workload.traces import Trace

    trace = Trace(arrival_s=[i / rate for i in range(n)], prompt_id=list(range(n)))
    result = asyncio.run(run_load(url, trace, timeout_s=600.0, poll_s=5.0))
    latency = [q.latency_s for q in result.queries]
    return {"latency_s": latency, "server_s": result.server_total_s, "send_lag_s": result.send_lag_s,
            "errors": dict(result.client_errors)}


def httpx_client(url: str, rate: float, n: int, keepalive) -> dict:
    """The same open loop and timing with httpx, as a baseline (``keepalive``: max kept-alive connections)."""
    import httpx

    async def run() -> dict:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=keepalive)
        latency, server, lag, errors = [None] * n, [None] * n, [0.0] * n, {}
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
            t0 = time.monotonic()

            async def one(i: int) -> None:
                sent = time.monotonic() - t0
                lag[i] = max(0.0, sent - i / rate)
                try:
                    r = await client.post(f"{url}/v1/images/generations", json={"prompt": "p", "n": 1, "seed": i})
                    record = r.json()["data"][0]
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    return
                latency[i] = time.monotonic() - t0 - sent
                server[i] = record["total_ms"] / 1e3

            tasks = []
            for i in range(n):
                delay = i / rate - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        return {"latency_s": latency, "server_s": server, "send_lag_s": lag, "errors": errors}

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------- report


def row(name: str, open_requests: int, measured: dict) -> str:
    pairs = [(c, s) for c, s in zip(measured["latency_s"], measured["server_s"]) if c is not None and s is not None]
    client = np.array([c for c, _ in pairs]) * 1e3
    server = np.array([s for _, s in pairs]) * 1e3
    added = client - server
    ratio = client / server
    lag = np.array(measured["send_lag_s"]) * 1e3
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(measured["errors"].items())) or "none"
    p = np.percentile
    return (f"{name:<22} {open_requests:>5} {len(pairs):>6} {p(server, 50):>9.1f} {p(client, 50):>9.1f} "
            f"{p(added, 50):>8.2f} {p(added, 99):>8.2f} {p(ratio, 50):>8.4f} {p(ratio, 99):>8.4f} "
            f"{p(lag, 99):>8.1f}   {errors}")


HEADER = (f"{'client':<22} {'open':>5} {'answers':>6} {'server50':>9} {'client50':>9} {'added50':>8} {'added99':>8} "
          f"{'ratio50':>8} {'ratio99':>8} {'lag99':>8}   client errors\n"
          f"{'':<22} {'':>5} {'':>6} {'ms':>9} {'ms':>9} {'ms':>8} {'ms':>8} {'':>8} {'':>8} {'ms':>8}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--open", type=int, nargs="+", default=[100, 1000], help="open requests (default 100 1000)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    ap.add_argument("--holds", type=float, default=2.0,
                    help="send for this many hold times: requests = open x holds (default 2)")
    ap.add_argument("--baseline", action="store_true", help="also measure httpx as diffsim load used it")
    ap.add_argument("--nagle", action="store_true", help="serve without TCP_NODELAY (diffsim serve before)")
    args = ap.parse_args(argv)
    import tempfile

    from diffsim.commands.load import raise_open_file_limit

    raise_open_file_limit()
    print(f"zero-latency server holding each request open/rate s; {args.rate:g} requests/s, "
          f"{'without' if args.nagle else 'with'} TCP_NODELAY on the server")
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for open_requests in args.open:
            hold = open_requests / args.rate
            n = int(open_requests * args.holds)
            clients = [("diffsim load (aiohttp)", lambda url: diffsim_client(url, args.rate, n))]
            if args.baseline:
                clients += [("httpx, 64 kept alive", lambda url: httpx_client(url, args.rate, n, 64)),
                            ("httpx, all kept alive", lambda url: httpx_client(url, args.rate, n, None))]
            for name, measure in clients:
                server = ServerProcess(hold, args.nagle, Path(tmp))
                try:
                    print(row(name, open_requests, measure(server.url)), flush=True)
                finally:
                    server.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve_zero_latency(sys.argv[2], float(sys.argv[3]), bool(int(sys.argv[4])))
    else:
        sys.exit(main())
