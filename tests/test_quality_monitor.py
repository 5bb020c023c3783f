"""Served-image FID (``diffsim serve --fid-reference``): the reservoir, the per-window FID against the
``diffsim quality fid`` command on the same images, the too-small-sample reason, and the server's
``/v1/quality`` and ``/metrics``.

As in ``test_calibrate.py``: a seeded random-weight Inception-v3 saved by the test, its 64-d feature, images fed
at 75 px (the ``small_inception`` patch) so that CPU time stays small. The numbers check the bookkeeping, not
image quality.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_loadgen import ManualClock, engine_on_clock, fake_server

from diffsim.cli import main as cli_main
from diffsim.errors import DiffsimError, InputError
from diffsim.quality.frechet import fid_against, save_stats
from diffsim.server.quality_monitor import Reservoir, build_quality_monitor

DIM = 64
PLAN = {"threshold": 0.5, "light_workers": 1, "heavy_workers": 1, "light_batch": 4, "heavy_batch": 4}


def _pngs(n: int, seed: int) -> list[bytes]:
    """Varied small images (random colour gradients with a rectangle), as PNG bytes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        a, b = rng.uniform(0, 255, size=(2, 3))
        img = np.stack([a[k] * xx + b[k] * yy for k in range(3)], -1) / 2
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        x0, y0 = rng.integers(0, 20, size=2)
        ImageDraw.Draw(im).rectangle([x0, y0, x0 + 10, y0 + 8], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _folder(path: Path, pngs: list[bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(pngs):
        (path / f"img{i:04d}.png").write_bytes(png)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_inception, inception_weights):
    """Reference statistics of 80 images, written by ``diffsim quality stats``."""
    root = tmp_path_factory.mktemp("fid-reference")
    out = root / "ref.npz"
    rc = cli_main(["quality", "stats", "--images", str(_folder(root / "ref", _pngs(80, seed=1))), "--out", str(out),
                   "--inception-weights", str(inception_weights), "--feature-dim", str(DIM), "--no-progress"])
    assert rc == 0
    return out


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _wait(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------- the reservoir


def test_reservoir_keeps_a_bounded_uniform_sample():
    k, m, runs = 5, 40, 4000
    counts = Counter()
    rng = random.Random(0)
    for _ in range(runs):
        r = Reservoir(k, rng)
        slots: dict[int, int] = {}
        for item in range(m):
            slot = r.offer()
            if slot is not None:
                assert 0 <= slot < k
                slots[slot] = item
        assert r.seen == m and r.filled == k and len(slots) == k
        counts.update(slots.values())
    # Every item is in the sample with probability k / m = 0.125 (binomial sd over 4000 runs: ~0.0052).
    freqs = np.array([counts[i] / runs for i in range(m)])
    assert np.abs(freqs - k / m).max() < 0.03


def test_reservoir_takes_everything_until_full():
    r = Reservoir(3, random.Random(0))
    assert [r.offer(), r.offer()] == [0, 1] and r.filled == 2


# ---------------------------------------------------------------- the monitor


def test_window_fid_equals_the_quality_fid_command(tmp_path, capsys, small_inception, inception_weights, reference):
    light, heavy = _pngs(70, seed=2), _pngs(70, seed=3)
    rc = cli_main(["quality", "fid", "--images", str(_folder(tmp_path / "served", light + heavy)),
                   "--ref-stats", str(reference), "--inception-weights", str(inception_weights),
                   "--feature-dim", str(DIM), "--json", "--no-progress"])
    assert rc == 0
    command = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert command["n"] == 140

    clock = Clock()
    monitor = build_quality_monitor(reference, inception_weights, clock=clock, window_s=10.0, sample=1000)
    assert monitor.sample == 1000 and monitor.reference.dim == DIM
    monitor.start()
    for i, png in enumerate(light + heavy):
        monitor.offer(png, "light" if i < 70 else "heavy", 2.0 + i * 0.01)
    monitor.stop()  # closes the (only) window
    [window] = monitor.windows()
    assert (window.start_s, window.end_s) == (0.0, 10.0)
    assert window.served == {"all": 140, "light": 70, "heavy": 70} and window.skipped == 0
    overall = window.stages["all"]
    assert overall.n == 140 and overall.fid == pytest.approx(command["fid"], rel=1e-6)
    # Per stage: the same extractor's FID of that stage's images.
    from diffsim.quality.frechet import load_stats
    from PIL import Image

    ref = load_stats(reference)
    for stage, pngs in (("light", light), ("heavy", heavy)):
        feats = monitor.extractor.features([Image.open(io.BytesIO(p)).convert("RGB") for p in pngs])
        assert window.stages[stage].n == 70
        assert window.stages[stage].fid == pytest.approx(fid_against(feats, ref).fid, rel=1e-6)
    body = monitor.describe()
    assert body["feature_dim"] == DIM and body["reference_n"] == 80 and body["windows"][0]["n"] == 140
    assert body["windows"][0]["fid"] == pytest.approx(command["fid"], rel=1e-6)


def test_a_small_window_reports_why_it_has_no_fid(small_inception, inception_weights, reference):
    clock = Clock()
    monitor = build_quality_monitor(reference, inception_weights, clock=clock, window_s=5.0)
    assert monitor.sample == 2 * DIM  # the default
    monitor.start()
    for png in _pngs(10, seed=4):
        monitor.offer(png, "light", 1.0)
    clock.t = 5.0 + 0.6  # past the window's end and its grace: the thread closes it on its own
    _wait(lambda: monitor.latest() is not None)
    window = monitor.latest()
    assert window.stages["all"].fid is None and window.stages["all"].n == 10
    assert "not meaningful for 64-d features" in window.stages["all"].reason
    assert window.stages["light"].n == 10 and window.stages["light"].fid is None
    assert window.stages["heavy"].n == 0 and "at least 2 images" in window.stages["heavy"].reason
    d = window.to_dict()
    assert d["fid"] is None and d["n"] == 10 and "64-d" in d["reason"]
    monitor.stop()
    assert len(monitor.windows()) == 1  # no empty window is made up at stop


def test_the_sample_is_bounded_per_window(small_inception, inception_weights, reference):
    clock = Clock()
    monitor = build_quality_monitor(reference, inception_weights, clock=clock, window_s=1.0, sample=6)
    pngs = _pngs(4, seed=5)
    for i in range(50):  # the thread is not started: offers only decide and queue
        monitor.offer(pngs[i % 4], "heavy" if i % 5 == 0 else "light", 0.5 if i < 30 else 1.5)
    monitor.start()
    monitor.stop()
    first, second = monitor.windows()
    assert (first.start_s, second.start_s) == (0.0, 1.0)
    assert first.served == {"all": 30, "light": 24, "heavy": 6} and second.served["all"] == 20
    assert first.stages["all"].n == 6 and second.stages["all"].n == 6
    assert first.stages["light"].n + first.stages["heavy"].n == 6


def test_reference_checks(tmp_path, small_inception, inception_weights, reference):
    from diffsim.quality.frechet import load_stats

    ref = load_stats(reference)
    other = save_stats(tmp_path / "other.npz", ref.mu, ref.sigma, ref.n, feature="inception_v3/maxpool1/sha256:0")
    with pytest.raises(InputError, match="other.npz: statistics come from feature extractor"):
        build_quality_monitor(other, inception_weights, clock=Clock())
    few = save_stats(tmp_path / "few.npz", ref.mu, ref.sigma, 40, feature=ref.feature)
    with pytest.raises(InputError, match="few.npz: FID on 40 images"):
        build_quality_monitor(few, inception_weights, clock=Clock())
    odd = save_stats(tmp_path / "odd.npz", np.zeros(5), np.eye(5), 10)
    with pytest.raises(InputError, match="odd.npz: statistics are 5-d"):
        build_quality_monitor(odd, inception_weights, clock=Clock())
    with pytest.raises(DiffsimError, match="--fid-sample"):
        build_quality_monitor(reference, inception_weights, clock=Clock(), sample=1)


@pytest.mark.parametrize("extra, message", [
    (["--fid-reference", "REF"], "--fid-reference needs --inception-weights"),
    (["--inception-weights", "W"], "give --fid-reference too"),
    (["--fid-reference", "REF", "--inception-weights", "W", "--fid-window-s", "0"], "--fid-window-s: must be a number >= 0.001"),
    (["--fid-reference", "missing.npz", "--inception-weights", "W"], "missing.npz: no such reference statistics"),
])
def test_serve_refuses_bad_quality_flags_in_one_line(extra, message, capsys, inception_weights, reference):
    extra = [str(reference) if a == "REF" else str(inception_weights) if a == "W" else a for a in extra]
    rc = cli_main(["serve", "--backend", "cpu-tiny", "--cascade", "sdturbo-sdv15", "--port", "0", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the server


def _post(url: str, seed: int, n: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": f"p{seed}", "n": n, "seed": seed}, timeout=60)


def test_server_reports_served_fid(tmp_path, monkeypatch, small_inception, inception_weights, reference):
    """The server's engine (and so its monitor) runs on a clock the test moves: 2 images served at t = 1
    (window [0, 4)), 80 at t = 5 (window [4, 8)), then the clock moves to 9 and both windows close. What
    each window holds is certain: the first has too few images for a FID, the second has one, and the
    light/heavy split is the one the answers report."""
    import concurrent.futures

    window_s = 4.0
    clock = ManualClock()
    engine_on_clock(monkeypatch, clock)
    server = fake_server(tmp_path, plan=PLAN, fid_reference=str(reference), inception_weights=str(inception_weights),
                         fid_window_s=window_s)

    def quality() -> dict:
        return httpx.get(f"{server.url}/v1/quality").json()

    with server:
        clock.t = 1.0
        first = _post(server.url, seed=7, n=2)
        assert first.status_code == 200
        clock.t = 5.0  # past the first window and its grace
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda i: _post(server.url, seed=1000 * i), range(10)))
        assert [r.status_code for r in answers] == [200] * 10
        assert quality()["current"]["served"]["all"] == 80
        clock.t = 9.0  # past the second window and its grace: the monitor closes it once its images are in
        _wait(lambda: len(quality()["windows"]) == 2)
        body = quality()
        text = httpx.get(f"{server.url}/metrics").text
    assert body["feature_dim"] == DIM and body["window_s"] == window_s and body["sample"] == 2 * DIM
    assert body["feature"].startswith("inception_v3/maxpool1/sha256:")
    assert body["late"] == 0 and body["errors"] == 0
    early, busy = body["windows"]
    assert (early["start_s"], early["end_s"], busy["start_s"], busy["end_s"]) == (0.0, 4.0, 4.0, 8.0)
    for w, responses in ((early, [first]), (busy, answers)):
        by_stage = Counter(item["served_by"] for r in responses for item in r.json()["data"])
        assert w["served"] == {"all": sum(by_stage.values()), "light": by_stage["light"], "heavy": by_stage["heavy"]}
        assert w["n"] == w["served"]["all"] and w["skipped"] == 0  # fewer than the sample size: all are in it
        for stage in ("light", "heavy"):
            assert w["stages"][stage]["n"] == by_stage[stage]
            assert (w["stages"][stage]["fid"] is None) == (by_stage[stage] <= DIM)
    assert early["n"] == 2 and early["fid"] is None and "64-d features" in early["reason"]
    assert busy["n"] == 80 and busy["fid"] is not None and busy["fid"] > 0 and busy["reason"] is None
    assert busy["served"]["light"] > 0 and busy["served"]["heavy"] > 0  # seeds 1000 i + j: both stages serve
    assert 'diffsim_served_fid_sample_size{stage="all"} 80.0' in text
    assert f'diffsim_served_fid{{stage="all"}} {busy["fid"]}' in text
    assert 'diffsim_served_fid{stage="light"}' in text and 'diffsim_served_fid{stage="heavy"}' in text
    assert "diffsim_served_fid_window_end_seconds 8.0" in text


def test_without_the_flags_nothing_changes(tmp_path):
    with fake_server(tmp_path, plan=PLAN) as server:
        assert _post(server.url, seed=1, n=2).status_code == 200
        r = httpx.get(f"{server.url}/v1/quality")
        text = httpx.get(f"{server.url}/metrics").text
        assert server.engine.quality is None and not server.engine.on_image
    assert r.status_code == 404 and r.json()["error"]["code"] == "quality_off"
    assert "diffsim_served_fid" not in text
