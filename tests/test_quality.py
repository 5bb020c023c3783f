"""FID/KID maths (numpy), reference-statistics files, Inception features and the quality CLI (CPU, no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsim.cli import main as cli_main
from diffsim.errors import DiffsimError, InputError
from diffsim.quality.frechet import (
    FeatureStats,
    check_sample_size,
    feature_stats,
    fid_against,
    frechet_distance,
    kid,
    load_stats,
    save_stats,
)
from image_helpers import write_noise_images

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- Fréchet distance


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 10_000))
def test_frechet_matches_closed_form_for_diagonal_covariances(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.01, 5.0, size=d), rng.uniform(0.01, 5.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_matches_general_matrix_square_root_formula():
    rng = np.random.default_rng(3)
    d = 20
    a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
    s1, s2 = a @ a.T / d, b @ b.T / d
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_frechet_of_identical_feature_sets_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = feature_stats(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    other = feats + 0.5
    mu2, sigma2 = feature_stats(other)
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(16 * 0.25, rel=1e-6)
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(frechet_distance(mu2, sigma2, mu, sigma))


def test_frechet_handles_singular_covariances():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 10))  # rank 4 covariance
    mu, sigma = feature_stats(feats)
    value = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-7)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(DiffsimError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_is_mean_and_unbiased_covariance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, (x - mu).T @ (x - mu) / 49)
    with pytest.raises(DiffsimError):
        feature_stats(x[:1])


# ---------------------------------------------------------------- sample size rule


def test_fid_refuses_samples_not_larger_than_feature_dim():
    rng = np.random.default_rng(0)
    ref_feats = rng.normal(size=(40, 32))
    mu, sigma = feature_stats(ref_feats)
    ref = FeatureStats(mu, sigma, 40)
    with pytest.raises(DiffsimError, match="32 images"):
        fid_against(rng.normal(size=(32, 32)), ref)
    small = fid_against(rng.normal(size=(32, 32)), ref, allow_small=True)
    assert small.small_sample and small.n == 32 and small.ref_n == 40
    ok = fid_against(rng.normal(size=(33, 32)), ref)
    assert not ok.small_sample and ok.n == 33 and ok.fid > 0
    with pytest.raises(DiffsimError, match="reference"):
        fid_against(rng.normal(size=(50, 32)), FeatureStats(mu, sigma, 10))
    with pytest.raises(DiffsimError):
        check_sample_size(1, 4, allow_small=True)


# ---------------------------------------------------------------- KID


def test_kid_same_distribution_is_near_zero_and_unbiased():
    rng = np.random.default_rng(0)
    means = []
    for seed in range(20):
        a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
        mean, std = kid(a, b, subsets=10, subset_size=100, seed=seed)
        assert abs(mean) < 0.1 and std > 0  # 10 different subsets of 100 out of 200: different values
        means.append(mean)
    # Unbiased: the average over independent draws is close to zero, and individual values fall on both sides.
    assert abs(np.mean(means)) < 3 * np.std(means) / np.sqrt(len(means)) + 1e-4
    assert min(means) < 0 < max(means)


def test_kid_known_values():
    """By hand, k(x, y) = (x.y / d + 1)^3 with d = 1: a = {0, 0}, b = {1, 1} give k(0, 0) = 1, k(1, 1) = 8,
    k(0, 1) = 1, so the unbiased MMD^2 is 2/2 + 16/2 - 2 x 4/4 = 7. Subsets as large as the sets are
    the sets themselves, in some order: every subset gives the same value, so the spread is 0."""
    a, b = np.zeros((2, 1)), np.ones((2, 1))
    assert kid(a, b, subsets=3, subset_size=2) == (7.0, 0.0)
    assert kid(b, a, subsets=3, subset_size=2) == (7.0, 0.0)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 3)), rng.normal(loc=0.5, size=(6, 3))
    k = lambda u, v: (float(u @ v) / 3 + 1.0) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    by_hand = (sum(k(x[i], x[j]) for i, j in pairs) / 30 + sum(k(y[i], y[j]) for i, j in pairs) / 30
               - 2 * sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36)
    mean, std = kid(x, y, subsets=4, subset_size=6)
    assert mean == pytest.approx(by_hand, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_shifted_distribution_is_clearly_positive_and_seeded():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 8)), rng.normal(loc=1.0, size=(200, 8))
    mean, std = kid(a, b, subsets=20, subset_size=100, seed=0)
    assert mean > 10 * std > 0
    assert kid(a, b, subsets=20, subset_size=100, seed=0) == (mean, std)
    with pytest.raises(DiffsimError, match="subset size"):
        kid(a, b, subsets=2, subset_size=500)


# ---------------------------------------------------------------- statistics files


def test_stats_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = feature_stats(rng.normal(size=(30, 5)))
    path = save_stats(tmp_path / "ref.npz", mu, sigma, 30, feature="inception_v3/avgpool/x")
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert loaded.n == 30 and loaded.feature == "inception_v3/avgpool/x" and loaded.dim == 5

    with pytest.raises(InputError, match="nope.npz"):
        load_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "no_n.npz", mu=mu, sigma=sigma)
    with pytest.raises(InputError, match=r"no_n.npz.*'n'"):
        load_stats(tmp_path / "no_n.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma, n=3)
    with pytest.raises(InputError, match="pickled.npz"):
        load_stats(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(InputError, match="junk.npz"):
        load_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:2], n=30)
    with pytest.raises(InputError, match="sigma"):
        load_stats(tmp_path / "shape.npz")


NO_TORCH_HELP = """
import contextlib, io, sys
from importlib.abc import MetaPathFinder

attempts = []

class NoTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "transformers", "timm", "diffusers"}:
            attempts.append(name)
            raise ImportError(name + " is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
import diffsim.quality, diffsim.quality.frechet, diffsim.quality.images
from diffsim import cli

for argv in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(argv.split())
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    print("== " + argv)
    print(out.getvalue())
assert not attempts, "tried to import: " + ", ".join(sorted(set(attempts)))
"""


def test_quality_and_discriminator_help_do_not_import_torch():
    argvs = ["quality --help", "quality stats --help", "quality fid --help", "quality kid --help",
             "quality clip-score --help", "discriminator --help", "discriminator score --help"]
    res = subprocess.run([sys.executable, "-c", NO_TORCH_HELP, *argvs], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sections = {block.split("\n", 1)[0]: block for block in res.stdout.split("== ")[1:]}
    quality = sections["quality --help"]
    for action in ("stats", "fid", "kid", "clip-score"):
        assert f"    {action}" in quality, action
    disc = sections["discriminator --help"]
    assert "    train" in disc and "    score" in disc
    for action in ("stats", "fid", "kid", "clip-score"):
        assert f"    {action} " not in disc and f"    {action}\n" not in disc, action
    assert "diffsim quality stats" in sections["quality fid --help"]  # --ref-stats names the new command


def test_measurements_are_no_longer_discriminator_actions(capsys):
    for action in ("stats", "fid", "kid", "clip-score"):
        assert cli_main(["discriminator", action, "--images", "x"]) == 2
        assert "invalid choice" in capsys.readouterr().err


def test_quality_refuses_a_batch_size_below_one(tmp_path, capsys):
    images = write_noise_images(tmp_path / "imgs", 3, seed=0, lo=0, hi=255)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,prompt\n" + "".join(f"im{i:03d}.png,a cat\n" for i in range(3)))
    for argv in (["stats", "--images", str(images), "--out", str(tmp_path / "s.npz"),
                  "--inception-weights", str(tmp_path / "w.safetensors")],
                 ["clip-score", "--images", str(images), "--prompts", str(prompts), "--clip", str(tmp_path)]):
        assert cli_main(["quality", *argv, "--batch-size", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--batch-size: must be an integer in 1..4096" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- Inception features and the CLI


def test_inception_features_shapes_and_weights_file(inception_weights, tmp_path):
    from PIL import Image

    from diffsim.quality.features import InceptionFeatures

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 50, 3)).astype(np.uint8)) for _ in range(3)]
    ext = InceptionFeatures(inception_weights, dim=64, input_size=75, batch_size=2)
    feats = ext.features(images)
    assert feats.shape == (3, 64) and feats.dtype == np.float64 and np.isfinite(feats).all()
    np.testing.assert_allclose(ext.features(images[:1]), feats[:1], rtol=1e-5, atol=1e-6)
    assert ext.name.startswith("inception_v3/maxpool1/sha256:")
    assert InceptionFeatures(inception_weights, dim=2048, input_size=75).features(images[:2]).shape == (2, 2048)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(InputError, match="bad.safetensors"):
        InceptionFeatures(bad, dim=64)
    from safetensors.numpy import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": np.zeros((2, 2), np.float32)}, str(wrong))
    with pytest.raises(InputError, match="wrong.safetensors.*Inception"):
        InceptionFeatures(wrong, dim=64)


def test_cli_stats_fid_kid(inception_weights, tmp_path, capsys):
    bright = write_noise_images(tmp_path / "bright", 4, seed=0, lo=150, hi=255)
    dark = write_noise_images(tmp_path / "dark", 4, seed=1, lo=0, hi=100)
    w = str(inception_weights)

    # Too few images for 64-d features: refused (before any feature extraction) unless --allow-small.
    assert cli_main(["quality", "fid", "--images", str(bright), "--ref-images", str(dark),
                     "--inception-weights", w, "--feature-dim", "64"]) == 2
    err = capsys.readouterr().err
    assert "4 images" in err and len(err.strip().splitlines()) == 1

    stats = tmp_path / "ref.npz"
    assert cli_main(["quality", "stats", "--images", str(dark), "--out", str(stats),
                     "--inception-weights", w, "--feature-dim", "64", "--no-progress"]) == 0
    assert load_stats(stats).n == 4
    capsys.readouterr()
    assert cli_main(["quality", "fid", "--images", str(bright), "--ref-stats", str(stats), "--json",
                     "--inception-weights", w, "--feature-dim", "64", "--allow-small", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["ref_n"] == 4 and result["small_sample"] and result["fid"] > 0
    assert cli_main(["quality", "fid", "--images", str(dark), "--ref-stats", str(stats), "--json",
                     "--inception-weights", w, "--feature-dim", "64", "--allow-small", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(0.0, abs=1e-6)

    # Statistics from another extractor are refused.
    assert cli_main(["quality", "fid", "--images", str(bright), "--ref-stats", str(stats),
                     "--inception-weights", w, "--feature-dim", "192", "--allow-small"]) == 2
    assert "64-d" in capsys.readouterr().err

    assert cli_main(["quality", "kid", "--images", str(bright), "--ref-images", str(dark), "--json",
                     "--inception-weights", w, "--feature-dim", "64", "--subsets", "5", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["subset_size"] == 4 and out["n"] == 4 and np.isfinite(out["kid"])


def test_cli_fid_missing_inputs_are_one_line_errors(tmp_path, capsys):
    images = write_noise_images(tmp_path / "imgs", 3, seed=0, lo=0, hi=255)
    assert cli_main(["quality", "fid", "--images", str(images), "--ref-stats", str(tmp_path / "x.npz"),
                     "--inception-weights", str(tmp_path / "w.safetensors"), "--allow-small"]) == 2
    err = capsys.readouterr().err.strip()
    assert "x.npz" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- CLIP score


def _tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP with a character-level tokenizer, saved as a local transformers directory."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {}
    for c in map(chr, range(33, 127)):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    out = folder / "clip"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_clip_score_matches_cosine_similarity_and_cli(tmp_path, capsys):
    import torch

    from diffsim.quality.features import ClipScorer
    from diffsim.quality.images import load_images

    torch.set_num_threads(1)
    clip_dir = _tiny_clip(tmp_path / "clipsrc")
    images_dir = write_noise_images(tmp_path / "imgs", 3, seed=0, lo=0, hi=255)
    prompts = ["a red cat", "a dog on a sofa", "a very long prompt " * 20]
    scorer = ClipScorer(clip_dir, batch_size=2)
    images = load_images(sorted(images_dir.iterdir()))
    scores = scorer.scores(images, prompts)

    # Independent path: the model's separate image and text towers, one pair at a time.
    for image, prompt, score in zip(images, prompts, scores):
        inputs = scorer.processor(text=[prompt], images=[image], return_tensors="pt", truncation=True,
                                  max_length=scorer.max_length)
        with torch.no_grad():
            img = scorer.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = scorer.model.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
        assert score == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
    with pytest.raises(DiffsimError, match="one prompt per image"):
        scorer.scores(images, prompts[:2])

    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text("image,prompt\n" + "".join(f'im{i:03d}.png,"{p}"\n' for i, p in enumerate(prompts)))
    out = tmp_path / "clip.csv"
    assert cli_main(["quality", "clip-score", "--images", str(images_dir), "--prompts", str(csv_path),
                     "--clip", str(clip_dir), "--out", str(out)]) == 0
    assert f"{scores.mean():.4f}" in capsys.readouterr().out
    assert out.read_text().splitlines()[0] == "image,clip_score" and len(out.read_text().splitlines()) == 4

    csv_path.write_text("image,prompt\nim000.png,a cat\n")
    assert cli_main(["quality", "clip-score", "--images", str(images_dir), "--prompts", str(csv_path),
                     "--clip", str(clip_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompts.csv" in err and "im001.png" in err and len(err.splitlines()) == 1
    csv_path.write_text("image,prompt\n" + "".join(f"im{i:03d}.png,a cat\n" for i in range(3)))
    assert cli_main(["quality", "clip-score", "--images", str(images_dir), "--prompts", str(csv_path),
                     "--clip", str(tmp_path / "noclip")]) == 2
    err = capsys.readouterr().err.strip()
    assert "noclip" in err and len(err.splitlines()) == 1
