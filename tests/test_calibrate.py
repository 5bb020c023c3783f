"""``diffsim calibrate`` and :mod:`diffsim.profiling.calibration`: prompt files, grids, curves, the written profile.

The pure parts (prompt parsing, f(t), which prompts stay light, FID of a mix, writing and validating the
cascades file) are tested without torch. One end-to-end run generates with the ``cpu-tiny`` models on 6 prompts.

FID in the end-to-end run: a seeded random-weight Inception-v3 saved by the test (the quality module's
``save_random_inception``; no download), its 64-d feature (first max pool) with ``--allow-small``, and images fed
at 75 px, the smallest input torchvision's Inception takes, instead of 299 px (the ``small_inception`` patch:
about 16x less CPU). The same patched extractor computes the independent check, so the numbers are comparable;
they say nothing about image quality, only that the bookkeeping is right.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsim.profiling import calibration as cal
from diffsim.allocator import DEFAULT_THRESHOLDS, allocate
from diffsim.cli import main as cli_main
from diffsim.errors import DiffsimError, InputError
from diffsim.profiles import load_cascade, load_cascades
from diffsim.quality.frechet import FeatureStats, feature_stats, fid_against
from diffsim.resources import resolve_profile

N_PROMPTS = 6


# ---------------------------------------------------------------- prompts files


def test_plain_prompts_get_line_positions_as_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n  a dog on a sofa, sleeping \nthird\n\n\n")
    prompts = cal.read_prompts(path)
    assert prompts == [cal.Prompt(0, "a cat"), cal.Prompt(1, "a dog on a sofa, sleeping"), cal.Prompt(2, "third")]
    assert cal.read_prompts(path, limit=2) == prompts[:2]


def test_plain_prompts_with_a_blank_line_inside_are_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\na dog\n")
    with pytest.raises(InputError, match=r"p.txt: line 2: empty prompt"):
        cal.read_prompts(path)


def test_csv_prompts_keep_their_ids_and_quoted_commas(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt_id,prompt\n17,"a cat, black"\n3,a dog\n\n')
    assert cal.read_prompts(path) == [cal.Prompt(17, "a cat, black"), cal.Prompt(3, "a dog")]


@pytest.mark.parametrize("body, message", [
    ("1,a cat, black\n", r"line 2: expected 2 fields"),
    ("x,a cat\n", r"line 2: prompt_id 'x' is not an integer"),
    ("1,a\n2,b\n1,c\n", r"line 4: prompt_id 1 appears twice"),
    ("-1,a\n", r"line 2: prompt_id -1 is negative"),
    ("1,a\n2,\n", r"line 3: empty prompt"),
    ("", r"no prompts in the file"),
])
def test_malformed_csv_prompts_name_the_line(tmp_path, body, message):
    path = tmp_path / "p.csv"
    path.write_text("prompt_id,prompt\n" + body)
    with pytest.raises(InputError, match=message):
        cal.read_prompts(path)


def test_missing_and_binary_prompt_files(tmp_path):
    with pytest.raises(InputError, match="no such prompts file"):
        cal.read_prompts(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(InputError, match="not UTF-8"):
        cal.read_prompts(bad)


# ---------------------------------------------------------------- grids and seeds


def test_grids_from_ranges_and_lists():
    assert cal.parse_grid("0:1:0.005", "--thresholds") == DEFAULT_THRESHOLDS == cal.DEFAULT_THRESHOLDS
    assert cal.parse_grid("0:1:0.1", "--r-grid") == (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)
    assert cal.parse_grid("0, 0.25,1", "--r-grid") == (0, 0.25, 1)
    assert cal.parse_grid("0:1:0.3", "--r-grid") == (0, 0.3, 0.6, 0.9, 1)  # the end is always included


@pytest.mark.parametrize("text, message", [
    ("0.1,1", "start at 0 and end at 1"),
    ("0,0.9", "start at 0 and end at 1"),
    ("0,0.5,0.5,1", "increase strictly"),
    ("0,a,1", "expected comma-separated numbers"),
    ("0:1:0", "step must be > 0"),
    ("0", "at least two values"),
])
def test_bad_grids(text, message):
    with pytest.raises(DiffsimError, match=message):
        cal.parse_grid(text, "--r-grid")


def test_prompt_seeds_depend_on_prompt_and_seed_only():
    assert cal.prompt_seed(5, 0) == cal.prompt_seed(5, 0)
    assert len({cal.prompt_seed(p, s) for p in range(50) for s in range(3)}) == 150
    with pytest.raises(DiffsimError, match="--seed"):
        cal.prompt_seed(1, -1)


# ---------------------------------------------------------------- curves


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60))
def test_deferral_curve_is_the_fraction_below_each_threshold(confidences):
    conf = np.array(confidences)
    f = cal.deferral_curve(conf, DEFAULT_THRESHOLDS)
    assert f == [float(np.mean(conf < t)) for t in DEFAULT_THRESHOLDS]
    assert f[0] == 0.0  # no confidence is below 0
    assert all(a <= b for a, b in zip(f, f[1:]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.floats(0, 1))
def test_the_easiest_prompts_stay_light(confidences, r):
    conf = np.array(confidences)
    order = cal.easiest_first(conf)
    k = cal.light_count(r, len(conf))
    assert sorted(order.tolist()) == list(range(len(conf)))
    light, heavy = conf[order[:k]], conf[order[k:]]
    if len(light) and len(heavy):
        assert light.min() >= heavy.max()
    assert abs(k - r * len(conf)) <= 0.5


def test_a_threshold_serves_the_mix_the_fid_curve_describes():
    """At r = 1 - f(t), the prompts that stay light are exactly those with confidence >= t."""
    conf = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.05, 0.95, 0.6])
    for t in (0.0, 0.2, 0.55, 0.8, 1.0):
        r = 1 - cal.deferral_curve(conf, [t])[0]
        k = cal.light_count(r, len(conf))
        assert set(cal.easiest_first(conf)[:k].tolist()) == set(np.flatnonzero(conf >= t).tolist())


def _features(seed: int, n: int, shift: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)) + shift


def test_mix_fid_curve_ends_at_all_heavy_and_all_light():
    light, heavy, real = _features(1, 30, 2.0), _features(2, 30, 0.3), _features(3, 200, 0.0)
    mu, sigma = feature_stats(real)
    ref = FeatureStats(mu, sigma, len(real))
    conf = np.random.default_rng(4).uniform(size=30)
    curve = cal.mix_fid_curve(light, heavy, cal.easiest_first(conf), (0, 0.5, 1), ref)
    assert curve[0] == pytest.approx(fid_against(heavy, ref).fid)
    assert curve[2] == pytest.approx(fid_against(light, ref).fid)
    order = cal.easiest_first(conf)
    expected_mid = fid_against(np.concatenate([light[order[:15]], heavy[order[15:]]]), ref).fid
    assert curve[1] == pytest.approx(expected_mid)
    assert curve[0] < curve[1] < curve[2]  # light is farther from the reference here
    steps = []
    assert cal.mix_fid_curve(light, heavy, order, (0, 0.5, 1), ref, progress=steps.append) == curve
    assert steps == [1, 1, 1]  # one progress step per FID: a 2048-d FID takes seconds


def test_random_order_is_seeded():
    assert (cal.random_order(20, 1) == cal.random_order(20, 1)).all()
    assert not (cal.random_order(20, 1) == cal.random_order(20, 2)).all()


# ---------------------------------------------------------------- generation loop with stand-ins


class _FakeImage:
    def __init__(self, value: float):
        self.value = value

    def save(self, path, format):
        Path(path).write_text(str(self.value))


class _FakeExecutor:
    model = "fake"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds):
        self.calls.append(len(prompts))
        return [_FakeImage(s % 97 / 97) for s in seeds]

    def score(self, images):
        return np.array([im.value for im in images])


class _FakeExtractor:
    dim = 2
    name = "fake"

    def features(self, images):
        return np.array([[im.value, 1 - im.value] for im in images])


def test_run_stage_batches_scores_and_saves_in_prompt_order(tmp_path):
    prompts = [cal.Prompt(i * 10, f"p{i}") for i in range(7)]
    seeds = [cal.prompt_seed(p.prompt_id, 0) for p in prompts]
    ex, seen = _FakeExecutor(), []
    out = cal.run_stage(ex, prompts, seeds, batch_size=3, extractor=_FakeExtractor(), score=True,
                        save_dir=tmp_path / "light", progress=seen.append)
    assert ex.calls == [3, 3, 1] and seen == [3, 3, 1]
    values = np.array([s % 97 / 97 for s in seeds])
    assert np.allclose(out.confidences, values)
    assert np.allclose(out.features[:, 0], values)
    assert sorted(p.name for p in (tmp_path / "light").iterdir()) == [cal.image_name(p.prompt_id) for p in prompts]


# ---------------------------------------------------------------- writing and validating the profile


def _calibration(n: int = 40) -> cal.Calibration:
    rng = np.random.default_rng(0)
    r = cal.DEFAULT_R_GRID
    return cal.Calibration(
        name="sdturbo-sdv15", light="sd-turbo", heavy="sd-v1.5", slo_s=5.0,
        prompts=[cal.Prompt(i + 1, f"p{i}") for i in range(n)], confidences=rng.uniform(size=n),
        thresholds=cal.DEFAULT_THRESHOLDS, r_grid=r, fid=[20 - 3 * x + 6 * x * x for x in r],
        fid_random_mix=[20 + 3 * x for x in r], gpu="test", date="2025-01-01", software={"python": "3"},
        method="synthetic", notes="",
    )


def test_written_profile_loads_and_the_allocator_accepts_it(tmp_path):
    result = _calibration()
    out, csv_path = cal.write_calibration(result, tmp_path / "prof.yaml")
    assert csv_path == tmp_path / "prof.confidences.csv"
    plan = cal.validate_profile(out, "sdturbo-sdv15", resolve_profile("a100"))
    assert plan.feasible
    cascade = load_cascade("sdturbo-sdv15", resolve_profile("a100"), out)
    assert cascade.confidences_path == csv_path
    assert cascade.fid(0.0) == pytest.approx(20) and cascade.random_mix_fid(1.0) == pytest.approx(23)
    assert cascade.deferral(0.5) == pytest.approx(np.mean(result.confidences < 0.5))
    plan = allocate(cascade, 16, 20.0)
    assert plan.feasible and 0 <= plan.threshold <= 1
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    assert rows[0] == ["prompt_id", "confidence"] and [int(r[0]) for r in rows[1:]] == list(range(1, 41))


def test_profile_without_the_confidences_link(tmp_path):
    out, csv_path = cal.write_calibration(_calibration(), tmp_path / "prof.yaml", link_confidences=False)
    assert csv_path.exists()
    assert load_cascades(out).cascades["sdturbo-sdv15"].confidences is None


def test_a_failed_check_leaves_no_profile_behind(tmp_path):
    def refuse(path):
        raise DiffsimError("refused")

    with pytest.raises(DiffsimError, match="refused"):
        cal.write_calibration(_calibration(), tmp_path / "prof.yaml", check=refuse)
    assert not (tmp_path / "prof.yaml").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["prof.confidences.csv"]


# ---------------------------------------------------------------- the command, end to end on cpu-tiny


def _synthetic_real_images(folder: Path, n: int, seed: int) -> Path:
    """Smooth random colour gradients with a rectangle: varied, and nothing like noise."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i in range(n):
        a, b, c = rng.uniform(0, 255, size=(3, 3))
        img = np.stack([a[k] * xx + b[k] * yy + c[k] * (1 - xx) * (1 - yy) for k in range(3)], -1)
        im = Image.fromarray(np.clip(img / 2, 0, 255).astype(np.uint8))
        x0, y0 = rng.integers(0, 40, size=2)
        ImageDraw.Draw(im).rectangle([x0, y0, x0 + 20, y0 + 16], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.save(folder / f"real{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, torch_one_thread, small_inception, inception_weights):
    root = tmp_path_factory.mktemp("calibrate")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(N_PROMPTS)) + "\n")
    real = _synthetic_real_images(root / "real", 8, seed=0)
    out = root / "profiles" / "tiny.yaml"
    argv = ["calibrate", "--cascade", "sdturbo-sdv15", "--prompts", str(prompts), "--real", str(real),
            "--backend", "cpu-tiny", "--out", str(out), "--discriminator-weights", "random",
            "--discriminator-arch", "test_efficientnet", "--inception-weights", str(inception_weights),
            "--feature-dim", "64", "--allow-small", "--batch-size", "4", "--seed", "3",
            "--save-images", str(root / "images"), "--no-progress"]
    assert cli_main(argv) == 0
    return {"root": root, "out": out, "real": real, "images": root / "images", "argv": argv}


def _fid_cli(images: Path, real: Path, weights: Path, capsys) -> float:
    capsys.readouterr()
    assert cli_main(["quality", "fid", "--images", str(images), "--ref-images", str(real),
                     "--inception-weights", str(weights), "--feature-dim", "64", "--allow-small", "--json",
                     "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)["fid"]


def test_calibrate_writes_a_profile_the_allocator_accepts(calibrated):
    out = calibrated["out"]
    doc = load_cascades(out)
    assert doc.provenance.source == "diffsim calibrate"
    assert "backend cpu-tiny" in doc.provenance.method and f"{N_PROMPTS} prompts" in doc.provenance.method
    assert {"torch", "diffusers", "diffsim"} <= set(doc.provenance.software)
    assert "SMALL SAMPLE" in doc.provenance.notes
    spec = doc.cascades["sdturbo-sdv15"]
    assert (spec.light, spec.heavy, spec.slo_s) == ("sd-turbo", "sd-v1.5", 5.0)  # from the shipped cascades
    assert spec.fid.sample_size == N_PROMPTS and spec.fid_random_mix.sample_size == N_PROMPTS
    cascade = load_cascade("sdturbo-sdv15", resolve_profile("a100"), out)
    assert allocate(cascade, 16, 10.0).feasible


def test_calibrated_deferral_curve_matches_the_confidences(calibrated):
    spec = load_cascades(calibrated["out"]).cascades["sdturbo-sdv15"]
    rows = list(csv.DictReader((calibrated["out"].parent / spec.confidences).read_text().splitlines()))
    assert [int(r["prompt_id"]) for r in rows] == list(range(N_PROMPTS))
    conf = np.array([float(r["confidence"]) for r in rows])
    assert ((0 <= conf) & (conf <= 1)).all()
    f = spec.deferral_curve.f
    assert spec.deferral_curve.t == list(DEFAULT_THRESHOLDS)
    assert f[0] == 0 and all(a <= b for a, b in zip(f, f[1:]))
    assert f == pytest.approx([float(np.mean(conf < t)) for t in DEFAULT_THRESHOLDS], abs=1e-6)  # 6 decimals


def test_calibrated_fid_ends_are_the_all_heavy_and_all_light_fids(calibrated, inception_weights, capsys):
    spec = load_cascades(calibrated["out"]).cascades["sdturbo-sdv15"]
    heavy = _fid_cli(calibrated["images"] / "heavy", calibrated["real"], inception_weights, capsys)
    light = _fid_cli(calibrated["images"] / "light", calibrated["real"], inception_weights, capsys)
    assert heavy != pytest.approx(light, rel=1e-3)  # the two models' images differ
    for curve in (spec.fid, spec.fid_random_mix):
        assert curve.r == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1]
        assert curve.fid[0] == pytest.approx(heavy, rel=1e-4)
        assert curve.fid[-1] == pytest.approx(light, rel=1e-4)


def test_saved_images_and_prompt_index(calibrated):
    images = calibrated["images"]
    names = [cal.image_name(i) for i in range(N_PROMPTS)]
    for role in ("light", "heavy"):
        assert sorted(p.name for p in (images / role).iterdir()) == names
    rows = list(csv.reader((images / "prompts.csv").read_text().splitlines()))
    assert rows[0] == ["image", "prompt"] and rows[1] == [names[0], "a photo of object number 0"]


def test_images_only_generates_without_discriminator_or_reference(calibrated, tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt_id,prompt\n40,a red car\n41,a blue boat\n")
    argv = ["calibrate", "--cascade", "sdturbo-sdv15", "--prompts", str(prompts), "--backend", "cpu-tiny",
            "--images-only", "light", "--save-images", str(tmp_path / "gen"), "--seed", "3", "--no-progress"]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "gen" / "light").iterdir()) == ["000040.png", "000041.png"]
    assert not (tmp_path / "gen" / "heavy").exists()


def test_reference_stats_of_another_dimension_are_refused(calibrated, tmp_path, capsys):
    from diffsim.quality.frechet import save_stats

    stats = save_stats(tmp_path / "ref.npz", np.zeros(192), np.eye(192), 500, feature="x")
    argv = list(calibrated["argv"])
    argv[argv.index("--real") + 1] = str(stats)
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert "statistics are 192-d but --feature-dim is 64" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--prompts": "@bad.csv"}, "line 3: prompt_id 'x' is not an integer"),
    ({"--cascade": "mine"}, "not a shipped cascade: give --light, --heavy and --slo-s"),
    ({"--real": None}, "--real is required"),
    ({"--discriminator-weights": "@missing.safetensors"}, "no such discriminator weights file"),
    ({"--r-grid": "0,0.5"}, "--r-grid: the grid must start at 0 and end at 1"),
    ({"--allow-small": None}, "FID on 6 images"),
    ({"--out": "@x.json"}, "must end in .yaml"),
])
def test_bad_inputs_fail_in_one_line_before_any_model_loads(calibrated, tmp_path, capsys, change, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt_id,prompt\n1,a\nx,b\n")
    argv = list(calibrated["argv"])
    for flag, value in change.items():
        if flag not in argv:
            argv += [flag, value]
            continue
        i = argv.index(flag)
        if value is None:
            del argv[i:i + (1 if flag == "--allow-small" else 2)]
        else:
            argv[i + 1] = str(tmp_path / value[1:]) if value.startswith("@") else value
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsim calibrate: error:") and message in err and len(err.strip().splitlines()) == 1
