"""The discriminator: ROC-AUC and split helpers, building/scoring, the train and score CLI, input errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from backends.discriminator import build_discriminator, settings_path  # noqa: E402
from backends.discriminator_training import (  # noqa: E402
    TrainConfig,
    roc_auc,
    stratified_split,
    train_discriminator,
)
from diffsim.cli import main as cli_main  # noqa: E402
from diffsim.errors import DiffsimError, InputError  # noqa: E402
from image_helpers import write_noise_images

TINY_ARCH = "test_efficientnet"  # timm's smallest EfficientNet (~0.1 M parameters)
TINY_SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("disc")
    return {"real": write_noise_images(root / "real", 15, seed=0, lo=140, hi=256, size=36),
            "fake": write_noise_images(root / "fake", 15, seed=1, lo=0, hi=116, size=36), "root": root}


@pytest.fixture(scope="module")
def trained(data):
    out = data["root"] / "model" / "disc.safetensors"
    torch.set_num_threads(1)
    rc = cli_main(["discriminator", "train", "--real", str(data["real"]), "--fake", str(data["fake"]),
                   "--out", str(out), "--arch", TINY_ARCH, "--image-size", str(TINY_SIZE), "--epochs", "6",
                   "--batch-size", "8", "--lr", "3e-3", "--seed", "0", "--no-progress"])
    assert rc == 0
    return out


# ---------------------------------------------------------------- pure helpers


def test_roc_auc_known_cases():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=30))
def test_roc_auc_equals_pairwise_probability(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        assert np.isnan(roc_auc(labels, scores))
        return
    expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(labels, scores) == pytest.approx(expected)


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares():
    labels = np.array([1] * 10 + [0] * 30)
    train, val = stratified_split(labels, 0.2, seed=4)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(40))
    assert (labels[val] == 1).sum() == 2 and (labels[val] == 0).sum() == 6
    again = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=5)[1], val)
    assert len(stratified_split(labels, 0.0, seed=0)[1]) == 0


# ---------------------------------------------------------------- building and scoring


def test_random_discriminator_scores_probabilities_deterministically():
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 30, 3)).astype(np.uint8)) for _ in range(3)]
    a = build_discriminator(TINY_ARCH, image_size=TINY_SIZE)
    b = build_discriminator(TINY_ARCH, image_size=TINY_SIZE)
    sa = a.score(images)
    assert sa.shape == (3,) and sa.dtype == np.float64 and ((sa >= 0) & (sa <= 1)).all()
    np.testing.assert_array_equal(sa, b.score(images))
    assert a.score([]).shape == (0,)
    assert a.arch == TINY_ARCH and a.image_size == TINY_SIZE
    with pytest.raises(DiffsimError, match="no discriminator weights"):
        build_discriminator(TINY_ARCH, pretrained_random_ok=False)
    with pytest.raises(DiffsimError, match="resnet50"):
        build_discriminator("resnet50")


# ---------------------------------------------------------------- train + score CLI


def test_train_cli_learns_to_separate_and_writes_settings(trained):
    info = json.loads(settings_path(trained).read_text())
    assert info["arch"] == TINY_ARCH and info["image_size"] == TINY_SIZE and info["seed"] == 0
    assert info["classes"] == {"0": "generated", "1": "real"} and info["real_class"] == 1
    assert info["counts"] == {"train": {"real": 12, "generated": 12}, "val": {"real": 3, "generated": 3}}
    assert len(info["history"]) == 6 and info["epochs"] == 6
    assert info["final"]["val_accuracy"] >= 0.9
    assert info["final"]["val_roc_auc"] >= 0.9


def test_score_cli_writes_one_row_per_image_sorted(trained, data, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    for folder in ("real", "fake"):
        assert cli_main(["discriminator", "score", "--weights", str(trained), "--images", str(data[folder]),
                         "--out", str(tmp_path / f"{folder}.csv"), "--batch-size", "4"]) == 0
    rows = {k: list(csv.DictReader(open(tmp_path / f"{k}.csv"))) for k in ("real", "fake")}
    assert [r["image"] for r in rows["real"]] == sorted(p.name for p in data["real"].iterdir())
    conf = {k: np.array([float(r["confidence"]) for r in v]) for k, v in rows.items()}
    assert ((conf["real"] >= 0) & (conf["real"] <= 1)).all()
    assert conf["real"].mean() > conf["fake"].mean() + 0.5
    with open(tmp_path / "real.csv") as fh:
        assert fh.readline().strip() == "image,confidence"

    capsys.readouterr()
    assert cli_main(["discriminator", "score", "--weights", str(trained), "--images", str(data["real"])]) == 0
    stdout_rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert stdout_rows == rows["real"]
    assert not out.exists()


def test_training_is_deterministic_for_a_seed(data):
    real = sorted(data["real"].iterdir())[:8]
    fake = sorted(data["fake"].iterdir())[:8]

    def weights(seed):
        cfg = TrainConfig(arch=TINY_ARCH, image_size=TINY_SIZE, epochs=2, batch_size=4, seed=seed)
        result = train_discriminator(real, fake, cfg, progress=False, log=lambda _line: None)
        return result.model.state_dict(), [m.val_accuracy for m in result.history]

    (a, ha), (b, hb), (c, _) = weights(7), weights(7), weights(8)
    assert ha == hb
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_init_from_weights_and_from_an_imagenet_style_head(trained, data, tmp_path):
    from safetensors.torch import save_file
    import timm

    real, fake = sorted(data["real"].iterdir())[:4], sorted(data["fake"].iterdir())[:4]
    lines = []
    cfg = TrainConfig(image_size=TINY_SIZE, epochs=1, batch_size=4, init=trained)  # arch from the init's JSON
    result = train_discriminator(real, fake, cfg, progress=False, log=lines.append)
    assert result.settings.arch == TINY_ARCH and "all weights from" in lines[0]

    imagenet = tmp_path / "imagenet.safetensors"
    save_file(timm.create_model(TINY_ARCH, pretrained=False, num_classes=1000).state_dict(), str(imagenet))
    lines.clear()
    cfg = TrainConfig(arch=TINY_ARCH, image_size=TINY_SIZE, epochs=1, batch_size=4, init=imagenet)
    train_discriminator(real, fake, cfg, progress=False, log=lines.append)
    assert "fresh 2-class head" in lines[0] and "1000 classes" in lines[0]


# ---------------------------------------------------------------- bad inputs: one line naming the file


def _one_line_error(capsys, argv, needle):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    assert "Traceback" not in err


def test_malformed_image_folders(trained, data, tmp_path, capsys):
    from PIL import Image

    train = ["discriminator", "train", "--fake", str(data["fake"]), "--out", str(tmp_path / "x.safetensors"),
             "--arch", TINY_ARCH, "--image-size", str(TINY_SIZE), "--epochs", "1", "--no-progress", "--real"]
    _one_line_error(capsys, train + [str(tmp_path / "missing")], "missing")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, train + [str(tmp_path / "empty")], "empty")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.new("RGB", (8, 8)).save(corrupt / "a.png")
    (corrupt / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _one_line_error(capsys, train + [str(corrupt)], "b.png")
    _one_line_error(capsys, ["discriminator", "score", "--weights", str(trained), "--images", str(corrupt)],
                    "b.png")

    stray = tmp_path / "stray"
    stray.mkdir()
    Image.new("RGB", (8, 8)).save(stray / "a.png")
    (stray / "notes.txt").write_text("hello")
    (stray / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped
    _one_line_error(capsys, train + [str(stray)], "notes.txt")


def test_malformed_weights_files(trained, data, tmp_path, capsys):
    score = ["discriminator", "score", "--images", str(data["real"]), "--weights"]
    _one_line_error(capsys, score + [str(tmp_path / "missing.safetensors")], "missing.safetensors")

    text = tmp_path / "text.safetensors"
    text.write_text("definitely not safetensors")
    _one_line_error(capsys, score + [str(text)], "text.safetensors")

    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"layer.weight": torch.zeros(2, 2)}, str(wrong))
    _one_line_error(capsys, score + [str(wrong), "--arch", TINY_ARCH], "wrong.safetensors")

    # The trained weights without their JSON, read as another architecture.
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(Path(trained).read_bytes())
    _one_line_error(capsys, score + [str(bare), "--arch", "efficientnet_b0"], "bare.safetensors")
    with pytest.raises(InputError, match="bare.safetensors.*missing keys"):
        build_discriminator("efficientnet_b0", weights=bare)
    assert build_discriminator(TINY_ARCH, weights=bare, image_size=TINY_SIZE).arch == TINY_ARCH
    # A requested arch that contradicts the settings file.
    with pytest.raises(InputError, match=r"disc.json"):
        build_discriminator("efficientnet_b0", weights=trained)

    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes(Path(trained).read_bytes())
    settings_path(bad_json).write_text("{ not json")
    _one_line_error(capsys, score + [str(bad_json)], "badjson.json")


def test_train_refuses_bad_options(data, tmp_path, capsys):
    base = ["discriminator", "train", "--real", str(data["real"]), "--fake", str(data["fake"]), "--no-progress"]
    _one_line_error(capsys, base + ["--out", str(tmp_path / "x.pt")], "x.pt")
    _one_line_error(capsys, base + ["--out", str(tmp_path / "x.safetensors"), "--epochs", "0"], "--epochs")
    _one_line_error(capsys, base + ["--out", str(tmp_path / "x.safetensors"), "--arch", "resnet50"], "resnet50")


def test_train_help_states_the_train_config_defaults():
    import argparse

    from backends.discriminator_training import DEFAULT_TRAIN_ARCH, TrainConfig
    from diffsim.commands import discriminator

    parser = argparse.ArgumentParser()
    discriminator.add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["discriminator"]
    train = sub._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    cfg = TrainConfig()
    assert f"else {DEFAULT_TRAIN_ARCH}" in text
    assert f"default {cfg.epochs})" in text and f"default {cfg.image_size};" in text
    assert f"default {cfg.batch_size}" in text and f"default {cfg.lr:g})" in text
    assert f"default {cfg.val_fraction})" in text and f"default {cfg.seed})" in text
