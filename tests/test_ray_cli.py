"""``diffsim serve --ray local --backend cpu-tiny`` as a user runs it: a private one-machine Ray cluster,
real tiny models inside the worker actors, the README's curl example, SIGTERM -> drained, exit 0, and
the cluster gone. In a module of its own so that its cluster never overlaps the one of tests/test_ray.py."""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tempfile

import httpx
import pytest

from test_server_http import tiny_profile, wait_listening

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def test_serve_on_a_local_ray_cluster_answers_the_readme_example(tmp_path):
    profile = tiny_profile(tmp_path / "tiny.yaml")
    temp = tempfile.mkdtemp(prefix="dsr-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
           "TMPDIR": temp}
    env.pop("RAY_TMPDIR", None)
    cmd = [sys.executable, "-m", "diffsim.cli", "serve", "--ray", "local", "--backend", "cpu-tiny",
           "--cascade", "sdturbo-sdv15", "--gpus", "1", "--port", "0", "--gpu-profile", str(profile),
           "--discriminator-arch", "test_efficientnet", "--batch-sizes", "1,2,4", "--slo-s", "60",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, line = wait_listening(proc, 240)  # a guard: a fresh cluster plus torch in the actor
        assert "Ray actors, cluster local" in line
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a cat on a laptop", "n": 2, "seed": 7},
                       timeout=120)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 2 and all(d["b64_json"] and d["model"] in ("sd-turbo", "sd-v1.5") for d in data)
        snap = httpx.get(f"{url}/v1/plan").json()
        assert snap["workers"]["in_service"] == 1
        assert snap["workers"]["health"][0]["state"] == "up"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = os.listdir(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert rc == 0, proc.stderr.read()
    assert not [name for name in left if name.startswith("diffsim-ray-")]  # the cluster's temp dir removed
