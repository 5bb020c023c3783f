"""The whole quality loop on synthetic data, through the CLI (CPU, ``cpu-tiny``, no downloads):

synthetic real and generated folders -> ``diffsim discriminator train`` -> weights -> ``diffsim discriminator
score`` -> CSV; ``diffsim quality stats`` of the real folder -> .npz; ``diffsim calibrate`` with those weights
and statistics -> profile; ``diffsim simulate`` with that profile.

FID uses a seeded random-weight Inception saved by the test, its 64-d feature with ``--allow-small``, at a 75 px
input (as in tests/test_calibrate.py, whose docstring says why). The images and scores mean nothing; what is
checked is that every step reads what the previous one wrote and that the numbers agree across steps.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffsim.cli import main as cli_main
from diffsim.profiles import load_cascades
from diffsim.resources import resolve_trace
from diffsim.workload.traces import read_trace, write_trace

pytest.importorskip("timm")

N_PROMPTS = 6
CASCADE = "sdturbo-sdv15"


def _real_images(folder: Path, n: int, seed: int) -> Path:
    """Smooth colour gradients with a rectangle ("real")."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i in range(n):
        a, b = rng.uniform(0, 255, size=(2, 3))
        img = np.stack([a[k] * xx + b[k] * yy for k in range(3)], -1) / 2
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        x0, y0 = rng.integers(0, 40, size=2)
        ImageDraw.Draw(im).rectangle([x0, y0, x0 + 20, y0 + 16], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.save(folder / f"real{i:03d}.png")
    return folder


def _fake_images(folder: Path, n: int, seed: int) -> Path:
    """Uniform noise ("generated")."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"fake{i:03d}.png")
    return folder


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))



@pytest.fixture(scope="module")
def loop(tmp_path_factory, torch_one_thread, small_inception):
    from diffsim.quality.features import save_random_inception

    root = tmp_path_factory.mktemp("loop")
    inception = tmp_path_factory.getbasetemp() / "inception-random-seed0.safetensors"
    if not inception.exists():  # shared with tests/test_calibrate.py within a session
        save_random_inception(inception, seed=0)
    real = _real_images(root / "real", 12, seed=0)
    fake = _fake_images(root / "fake", 12, seed=1)
    weights = root / "disc.safetensors"
    assert cli_main(["discriminator", "train", "--real", str(real), "--fake", str(fake), "--out", str(weights),
                     "--arch", "test_efficientnet", "--image-size", "32", "--epochs", "3", "--batch-size", "8",
                     "--seed", "0", "--no-progress"]) == 0
    scores = root / "fake_scores.csv"
    assert cli_main(["discriminator", "score", "--weights", str(weights), "--images", str(fake),
                     "--out", str(scores)]) == 0
    # Reference statistics once (what `serve`'s online FID reads too), then calibrate against them.
    real_stats = root / "real.npz"
    assert cli_main(["quality", "stats", "--images", str(real), "--out", str(real_stats),
                     "--inception-weights", str(inception), "--feature-dim", "64", "--no-progress"]) == 0
    prompts = root / "prompts.csv"
    prompts.write_text("prompt_id,prompt\n" + "".join(f'{i},"a photo of thing {i}, on a table"\n'
                                                      for i in range(N_PROMPTS)))
    profile = root / "profiles" / "loop.yaml"
    assert cli_main(["calibrate", "--cascade", CASCADE, "--prompts", str(prompts), "--real", str(real_stats),
                     "--backend", "cpu-tiny", "--out", str(profile), "--discriminator-weights", str(weights),
                     "--inception-weights", str(inception), "--feature-dim", "64", "--allow-small",
                     "--batch-size", "3", "--save-images", str(root / "generated"), "--no-progress"]) == 0
    return {"root": root, "weights": weights, "fake": fake, "scores": scores, "profile": profile,
            "generated": root / "generated", "real": real, "inception": inception}


def _simulate(trace: Path, cascades: Path, out: Path) -> dict:
    assert cli_main(["simulate", "--trace", str(trace), "--cascades", str(cascades), "--cascade", CASCADE,
                     "--gpu", "a100", "--gpus", "16", "--out", str(out), "--no-plot", "--quiet"]) == 0
    return json.loads((out / "summary.json").read_text())


def _check_sane(summary: dict, requests: int, fids: list[float]) -> None:
    assert summary["requests"] == requests
    assert summary["completed"] + summary["dropped"] + summary.get("failed", 0) + summary.get("rejected", 0) \
        + summary.get("unfinished", 0) == requests
    assert summary["completed"] > 0.9 * requests  # 9 qps is light load for 16 A100s
    for key in ("light_fraction", "deferral_fraction", "slo_violation_ratio", "gpu_utilization"):
        assert 0 <= summary[key] <= 1, key
    # The served mix's FID is read off the calibrated curve (summary.json rounds to 6 decimals).
    assert min(fids) - 1e-6 <= summary["mean_fid"] <= max(fids) + 1e-6
    assert summary["latency_p50_s"] > 0


def test_discriminator_score_writes_a_confidence_per_image(loop):
    rows = _read_csv(loop["scores"])
    assert [r["image"] for r in rows] == sorted(p.name for p in loop["fake"].iterdir())
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)


def test_calibrate_scores_light_images_as_discriminator_score_does(loop, tmp_path):
    """The confidences in the profile are the trained discriminator's P(real) of the saved light images."""
    out = tmp_path / "light_scores.csv"
    assert cli_main(["discriminator", "score", "--weights", str(loop["weights"]), "--images",
                     str(loop["generated"] / "light"), "--out", str(out)]) == 0
    by_image = {r["image"]: float(r["confidence"]) for r in _read_csv(out)}
    spec = load_cascades(loop["profile"]).cascades[CASCADE]
    rows = _read_csv(loop["profile"].parent / spec.confidences)
    assert len(rows) == N_PROMPTS
    for row in rows:
        assert float(row["confidence"]) == pytest.approx(by_image[f"{int(row['prompt_id']):06d}.png"], abs=1e-5)
    assert "sha256:" in load_cascades(loop["profile"]).provenance.method  # the discriminator file is named


def test_fid_against_reference_stats_matches_fid_against_the_folder(loop, capsys):
    """The profile's all-heavy FID (computed against real.npz) equals `quality fid` against the folder."""
    capsys.readouterr()
    assert cli_main(["quality", "fid", "--images", str(loop["generated"] / "heavy"), "--ref-images",
                     str(loop["real"]), "--inception-weights", str(loop["inception"]), "--feature-dim", "64",
                     "--allow-small", "--json", "--no-progress"]) == 0
    heavy = json.loads(capsys.readouterr().out)["fid"]
    assert load_cascades(loop["profile"]).cascades[CASCADE].fid.fid[0] == pytest.approx(heavy, rel=1e-4)


def test_simulate_uses_the_calibrated_confidences(loop, tmp_path):
    """static.csv's arrivals, its prompt ids folded onto the calibrated prompts so the CSV covers them."""
    trace = read_trace(resolve_trace("static.csv"))
    folded = dataclasses.replace(trace, prompt_id=(trace.prompt_id % N_PROMPTS).astype(np.int64), prompt=None,
                                 source="static.csv, prompt ids mod 6")
    write_trace(folded, tmp_path / "folded.csv")
    spec = load_cascades(loop["profile"]).cascades[CASCADE]
    summary = _simulate(tmp_path / "folded.csv", loop["profile"], tmp_path / "sim")
    _check_sane(summary, len(trace), spec.fid.fid)
    conf = {int(r["prompt_id"]): float(r["confidence"]) for r in _read_csv(loop["profile"].parent / spec.confidences)}
    queries = [q for q in _read_csv(tmp_path / "sim" / "queries.csv") if q["confidence"] not in ("", None)]
    assert queries
    for q in queries:
        assert float(q["confidence"]) == pytest.approx(conf[int(q["prompt_id"])], abs=1e-6)


def test_simulate_static_trace_with_the_curve_alone(loop, tmp_path):
    """Without the confidences link (prompt ids the CSV lacks) the simulator samples confidences from f(t)."""
    doc = yaml.safe_load(loop["profile"].read_text())
    del doc["cascades"][CASCADE]["confidences"]
    unlinked = tmp_path / "unlinked.yaml"
    unlinked.write_text(yaml.safe_dump(doc, sort_keys=False))
    summary = _simulate(resolve_trace("static.csv"), unlinked, tmp_path / "sim")
    _check_sane(summary, len(read_trace(resolve_trace("static.csv"))), doc["cascades"][CASCADE]["fid"]["fid"])
