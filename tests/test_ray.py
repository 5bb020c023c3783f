"""``diffsim serve --ray``: workers as Ray actors on an emulated multi-node cluster (one module-scoped
``ray.cluster_utils.Cluster``: a head and two worker nodes, each offering two cpu-tiny slots). The
executors are fixed-latency fakes (:mod:`backends.fake`): the tiny diffusion models would dominate the
time on two cores and prove nothing more about placement and loss. A node is killed under load: every
request is answered once, the plan shrinks to the live workers, and grows back when the actors restart
on a new node."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster

from backends.fake import FixedLatencyFactory
from diffsim.config import ControllerConfig, HealthConfig
from diffsim.server.http import HttpSettings
from diffsim.server.ray_worker import CPU_SLOT, RayWorker
from diffsim.server.startup import BackgroundServer, ServeOptions
from test_server_http import _metric as metric
from test_server_http import tiny_profile

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

NODE = dict(num_cpus=1, resources={CPU_SLOT: 2}, object_store_memory=80 * 2**20)


@pytest.fixture(scope="module")
def cluster():
    """A private cluster: its own temp dir (and Ray's address file in it), no dashboard, token auth off,
    fast node health checks; shut down (never `ray stop`) at the end."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    temp = tempfile.mkdtemp(prefix="dsr-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TMPDIR"] = temp
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20, temp_dir=os.path.join(temp, "ray"),
        _system_config={"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                        "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}))
    nodes = [c.add_node(**NODE) for _ in range(2)]
    ray.init(address=c.address, logging_level="warning", log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start(tmp_path, cluster_address, *, gpus=4, light_s=0.2, heavy_s=0.2, static_plan=None):
    options = ServeOptions(
        backend="cpu-tiny", cascade="sdturbo-sdv15", gpus=gpus, policy="static",
        static_plan=static_plan or {"threshold": 0.5, "light_workers": 2, "heavy_workers": 2, "light_batch": 2,
                                    "heavy_batch": 2},
        gpu_profile=str(tiny_profile(tmp_path / "tiny.yaml")), slo_s=60.0, batch_sizes=(1, 2, 4),
        controller=ControllerConfig(tick_s=0.2, replan_s=1.0),
        health=HealthConfig(max_failures=2, probe_s=0.5, stall_min_s=20.0),
        ray=cluster_address)
    server = BackgroundServer(options, HttpSettings(max_n=4, image_size="8x8"),
                              executor_factory=FixedLatencyFactory(light_s, heavy_s))
    server.start(timeout_s=120)
    return server


def post(url, i):
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": f"p{i}", "n": 1, "seed": i}, timeout=120)


def wait_until(predicate, what, timeout_s=90.0):
    """Poll; the timeout is a failure guard, not a measurement."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def test_worker_actors_spread_over_the_nodes_and_serve(cluster, tmp_path):
    c, nodes = cluster
    server = start(tmp_path, c.address)
    try:
        engine = server.engine
        assert all(isinstance(w, RayWorker) for w in engine.workers)
        wheres = [ray.get(w._actor.where.remote()) for w in engine.workers]
        node_ids = {n.node_id for n in nodes}
        assert {w["node_id"] for w in wheres} == node_ids  # two slots on each worker node, none on the head
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: post(server.url, i), range(8)))
        assert [r.status_code for r in responses] == [200] * 8
        for i, r in enumerate(responses):
            [item] = r.json()["data"]
            assert item["deferred"] == ((i % 100) / 100 < 0.5)  # the fake's confidence is seed/100
            assert item["model"] == ("sd-v1.5" if item["deferred"] else "sd-turbo")
        snap = httpx.get(f"{server.url}/v1/plan").json()
        assert snap["workers"]["in_service"] == 4 and snap["plan"]["gpus"] == 4
    finally:
        server.stop()


def test_killing_a_node_under_load_loses_no_request(cluster, tmp_path):
    c, nodes = cluster
    server = start(tmp_path, c.address, light_s=0.3, heavy_s=0.3)
    try:
        engine = server.engine
        url = server.url
        on_node = {}
        for w in engine.workers:
            on_node.setdefault(ray.get(w._actor.where.remote())["node_id"], []).append(w.index)
        victim = nodes[1]
        lost_workers = sorted(on_node[victim.node_id])
        n = 48
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(post, url, i) for i in range(n)]
            wait_until(lambda: all(engine.dispatcher.inflight), "every worker runs a batch")
            c.remove_node(victim)
            responses = [f.result() for f in futures]
        codes = [r.status_code for r in responses]
        assert codes == [200] * n, codes  # a 60 s SLO: every request is served, none lost or failed
        wait_until(lambda: engine.plan.gpus == 2, "the plan shrinks to the two live workers")
        assert [engine.health.state[w] for w in lost_workers] == ["lost", "lost"]
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "diffsim_queries_total") == n
        assert metric(text, 'diffsim_queries_total{outcome="completed"}') == n
        assert metric(text, "diffsim_lost_batches") >= 1
        assert metric(text, "diffsim_workers_in_service") == 2

        c.add_node(**NODE)  # room again: Ray restarts the two actors there, the probe brings them back
        wait_until(lambda: engine.health.count_in_service() == 4, "the restarted actors are back in service")
        wait_until(lambda: engine.plan.gpus == 4, "the plan grows back to four workers")
        more = [post(url, 100 + i) for i in range(4)]
        assert [r.status_code for r in more] == [200] * 4
    finally:
        server.stop()
