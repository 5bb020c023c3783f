"""The executors: specs, tiny pipelines on the CPU, local-directory loading, errors; CUDA where there is one."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from backends import MODEL_NAMES, get_spec, make_executor
from backends.base import from_png
from backends.pipelines import parse_weights
from diffsim.errors import DiffsimError, InputError

HAVE_DISCRIMINATOR = importlib.util.find_spec("backends.discriminator") is not None
needs_discriminator = pytest.mark.skipif(not HAVE_DISCRIMINATOR, reason="backends.discriminator is not there yet")

PROMPTS = ["a cat sitting on a mat", "a red bus on a street", "two dogs in the snow"]


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------------------
# Specs


def test_spec_settings_follow_the_artifact():
    expected = {  # name: (steps, guidance, resolution, scheduler)
        "sd-turbo": (1, 0.0, 512, "EulerDiscreteScheduler"),
        "sdxs": (1, 0.0, 512, "EulerDiscreteScheduler"),
        "sd-v1.5": (50, 7.5, 512, "PNDMScheduler"),
        "sdxl-lightning": (2, 0.0, 1024, "EulerDiscreteScheduler"),
        "sdxl": (50, 5.0, 1024, "EulerDiscreteScheduler"),
    }
    assert set(MODEL_NAMES) == set(expected)
    for name, (steps, guidance, res, sched) in expected.items():
        spec = get_spec(name)
        assert (spec.steps, spec.guidance_scale, spec.resolution, spec.scheduler) == (steps, guidance, res, sched)
        assert spec.cfg == (guidance > 1)
    assert get_spec("sdxl-lightning").scheduler_overrides["timestep_spacing"] == "trailing"
    assert get_spec("sdxs").vae_kind == "tiny"
    assert get_spec("sdxl").vae["force_upcast"] is True


def test_full_size_configs_build_the_reference_architectures(torch_one_thread):
    """Built on the meta device (no memory, no init), every full-size component has the parameter count
    the H100 reference lists for it (shared/reference/h100/README.md), to 0.1 M."""
    torch = torch_one_thread
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def millions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    reference_unet = {"sd-turbo": 865.9, "sdxs": 328.2, "sd-v1.5": 859.5, "sdxl-lightning": 2567.5, "sdxl": 2567.5}
    reference_te = {"sd-turbo": 340.4, "sdxs": 340.4, "sd-v1.5": 123.1, "sdxl-lightning": 123.1, "sdxl": 123.1}
    for name in MODEL_NAMES:
        spec = get_spec(name)
        with torch.device("meta"):
            assert millions(UNet2DConditionModel(**spec.unet)) == reference_unet[name], name
            assert millions(CLIPTextModel(CLIPTextConfig(**spec.text_encoder))) == reference_te[name], name
            vae = (AutoencoderTiny if spec.vae_kind == "tiny" else AutoencoderKL)(**spec.vae)
            assert millions(vae.decoder) == (1.2 if name == "sdxs" else 49.5), name
            if spec.text_encoder_2 is not None:
                te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
                assert millions(te2) == 694.7
            if spec.safety_checker is not None:
                sc = spec.safety_checker
                checker = StableDiffusionSafetyChecker(
                    CLIPConfig(vision_config=sc["vision"], projection_dim=sc["projection_dim"])
                )
                assert millions(checker) == 304.0


def test_full_size_random_pipelines_assemble_on_the_meta_device(torch_one_thread):
    """The ``random`` path for the full-size specs (no memory used): the right pipeline class, fp16,
    the spec's scheduler, SD v1.5 with its safety checker."""
    from backends.pipelines import build_pipeline

    for name in ("sd-v1.5", "sdxl-lightning"):
        spec = get_spec(name)
        pipe = build_pipeline(spec, "random", device="meta", dtype="fp16")
        assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if spec.family == "sdxl" else
                                       "StableDiffusionPipeline")
        assert pipe.unet.dtype == torch_one_thread.float16 and pipe.unet.device.type == "meta"
        assert type(pipe.scheduler).__name__ == spec.scheduler
        assert pipe.scheduler.config.timestep_spacing == spec.scheduler_config().get("timestep_spacing", "leading")
        # SDXL class (1024 px, fp32 decode): one image at a time, not ~110 GiB for a batch of 32.
        assert pipe.vae.use_slicing == (spec.family == "sdxl")
    assert pipe.vae.config.force_upcast  # SDXL decodes in fp32


def test_spec_check_names_mismatched_dimensions():
    spec = get_spec("sdxl", "tiny")
    bad = dataclasses.replace(spec, unet={**spec.unet, "cross_attention_dim": 48})
    with pytest.raises(DiffsimError, match="cross_attention_dim 48 != text width 64"):
        bad.check()
    bad = dataclasses.replace(spec, resolution=96)
    with pytest.raises(DiffsimError, match="sample_size"):
        bad.check()


def test_tiny_specs_keep_the_architecture_flags():
    for name in MODEL_NAMES:
        full, tiny = get_spec(name), get_spec(name, "tiny")
        assert tiny.resolution <= 64
        for key in ("down_block_types", "up_block_types", "use_linear_projection", "mid_block_type",
                    "addition_embed_type"):
            assert (key in full.unet) == (key in tiny.unet), (name, key)
            if key != "down_block_types" and key != "up_block_types":
                assert full.unet.get(key) == tiny.unet.get(key), (name, key)
        assert (full.steps, full.guidance_scale, full.scheduler) == (tiny.steps, tiny.guidance_scale, tiny.scheduler)


# ----------------------------------------------------------------------------------------------
# The tokenizer for random weights


def test_byte_level_tokenizer_frames_and_pads_like_clip():
    from backends.tokenizer import BOS_ID, EOS_ID, byte_level_clip_tokenizer

    tok = byte_level_clip_tokenizer()
    ids = tok(["A  Cat!"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    # "a", "cat", "!" -> a</w>, c, a, t</w>, !</w>: lower-cased, one token per byte, word ends marked.
    assert ids[1:7] == [256 + ord("a"), ord("c"), ord("a"), 256 + ord("t"), 256 + ord("!"), EOS_ID]
    long_ids = tok(["x" * 500], truncation=True, max_length=77).input_ids[0]
    assert len(long_ids) == 77 and long_ids[-1] == EOS_ID


# ----------------------------------------------------------------------------------------------
# Tiny pipelines on the CPU


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_tiny_executor_generates_seeded_images(model, torch_one_thread):
    ex = make_executor("cpu-tiny", model, discriminator=False)
    size = get_spec(model, "tiny").resolution
    images = ex.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], [11, 22, 12])
    assert len(images) == 3
    for img in images:
        assert img.size == (size, size) and img.mode == "RGB"
    # Same prompt and seed -> same image, whatever the batch and its order; another seed -> another image.
    swapped = ex.generate(PROMPTS[1::-1], [22, 11])
    assert np.abs(_pixels(swapped[1]) - _pixels(images[0])).max() <= 2
    assert np.abs(_pixels(swapped[0]) - _pixels(images[1])).max() <= 2
    assert np.abs(_pixels(images[2]) - _pixels(images[0])).mean() > 1.0


def test_png_bytes_round_trip(torch_one_thread):
    ex = make_executor("cpu-tiny", "sdxs", discriminator=False)
    (png,) = ex.generate_png(PROMPTS[:1], [5])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (img,) = ex.generate(PROMPTS[:1], [5])
    assert np.array_equal(_pixels(from_png(png)), _pixels(img))


def test_random_weights_are_the_same_in_every_executor(torch_one_thread):
    a = make_executor("cpu-tiny", "sd-turbo", discriminator=False).generate(PROMPTS[:1], [3])[0]
    b = make_executor("cpu-tiny", "sd-turbo", discriminator=False).generate(PROMPTS[:1], [3])[0]
    assert np.array_equal(_pixels(a), _pixels(b))
    c = make_executor("cpu-tiny", "sd-turbo", discriminator=False, seed=1).generate(PROMPTS[:1], [3])[0]
    assert not np.array_equal(_pixels(a), _pixels(c))


@pytest.mark.parametrize("model", ["sd-turbo", "sd-v1.5"])
def test_saved_pipeline_loads_through_the_local_directory_path(model, tiny_pipeline_dir, torch_one_thread):
    """save_pretrained -> from_pretrained(dir): the loaded pipeline is the random one, component for
    component (sd-v1.5 brings its safety checker and feature extractor along)."""
    path = tiny_pipeline_dir(model)
    loaded = make_executor("cpu-tiny", model, weights=str(path), discriminator=False)
    assert loaded.weights.kind == "local"
    fresh = make_executor("cpu-tiny", model, discriminator=False)
    a = loaded.generate(PROMPTS[:2], [1, 2])
    b = fresh.generate(PROMPTS[:2], [1, 2])
    for x, y in zip(a, b):
        assert np.abs(_pixels(x) - _pixels(y)).max() <= 1
    if model == "sd-v1.5":
        assert loaded._pipe.safety_checker is not None and loaded._pipe.feature_extractor is not None
    assert type(loaded._pipe.scheduler).__name__ == get_spec(model).scheduler


def test_memory_and_unload(torch_one_thread):
    ex = make_executor("cpu-tiny", "sdxs", discriminator=False)
    assert not ex.loaded
    ex.load()
    mem = ex.memory()
    assert mem.kind == "process-rss" and mem.in_use_bytes > 0 and mem.peak_bytes is None
    ex.unload()
    assert not ex.loaded
    assert len(ex.generate(PROMPTS[:1], [0])) == 1  # loads again on demand


@needs_discriminator
def test_score_gives_a_confidence_per_image(torch_one_thread):
    with make_executor("cpu-tiny", "sdxs") as ex:
        images = ex.generate(PROMPTS, [1, 2, 3])
        conf = ex.score(images)
        assert conf.shape == (3,) and conf.dtype == np.float64
        assert np.all((conf >= 0) & (conf <= 1))
        assert np.array_equal(conf, ex.score(images))
        assert ex.score([]).shape == (0,)


def test_score_without_a_discriminator_is_an_error(torch_one_thread):
    ex = make_executor("cpu-tiny", "sdxs", discriminator=False)
    images = ex.generate(PROMPTS[:1], [0])
    with pytest.raises(DiffsimError, match="without a discriminator"):
        ex.score(images)


# ----------------------------------------------------------------------------------------------
# Bad inputs: one-line DiffsimErrors


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unknown_backend_and_model():
    with pytest.raises(DiffsimError) as e:
        make_executor("tpu", "sdxs")
    assert "unknown backend 'tpu'" in _one_line(e)
    with pytest.raises(DiffsimError) as e:
        make_executor("cpu-tiny", "sd-9")
    assert "unknown model 'sd-9'" in _one_line(e)
    with pytest.raises(DiffsimError):
        get_spec("sdxs", "huge")


def test_missing_and_invalid_local_directories(tmp_path):
    with pytest.raises(InputError) as e:
        make_executor("cpu-tiny", "sdxs", weights=str(tmp_path / "nope"))
    assert "no such model directory" in _one_line(e) and "nope" in str(e.value)
    with pytest.raises(InputError) as e:
        make_executor("cpu-tiny", "sdxs", weights=str(tmp_path))
    assert "model_index.json" in _one_line(e)
    with pytest.raises(DiffsimError):
        make_executor("cpu-tiny", "sdxs", weights="not a source")


def test_weights_sources_are_parsed_without_loading():
    spec = get_spec("sd-turbo")
    assert parse_weights("random", spec).kind == "random"
    hub = parse_weights("hub", spec)
    assert (hub.kind, hub.location) == ("hub", "stabilityai/sd-turbo")
    assert parse_weights("someone/some-model", spec).location == "someone/some-model"


def test_executor_config_is_plain_data():
    from backends import ExecutorConfig, executor_from_config

    config = ExecutorConfig(backend="cpu-tiny", model="sdxs", discriminator=False, seed=3)
    assert all(isinstance(v, (str, int, bool, type(None))) for v in config.to_dict().values())
    ex = executor_from_config(config)
    assert (ex.backend, ex.model, ex.seed, ex.device, ex.dtype) == ("cpu-tiny", "sdxs", 3, "cpu", "fp32")
    assert not ex.loaded


def test_bad_batches_are_errors(torch_one_thread):
    ex = make_executor("cpu-tiny", "sdxs", discriminator=False)
    with pytest.raises(DiffsimError, match="2 prompts but 1 seeds"):
        ex.generate(PROMPTS[:2], [1])
    assert ex.generate([], []) == []
    assert not ex.loaded  # nothing was loaded for an empty batch


# ----------------------------------------------------------------------------------------------
# CUDA


def test_backends_import_without_torch_or_a_gpu():
    code = "import sys, backends, backends.cuda, backends.cpu_tiny; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # importing backends loads neither torch nor diffusers


def test_cuda_backend_without_a_gpu_is_a_clear_error(torch_one_thread):
    if torch_one_thread.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DiffsimError) as e:
        make_executor("cuda", "sd-turbo")
    assert "no CUDA device" in _one_line(e)


@pytest.mark.cuda
def test_cuda_executor_generates_full_size_images():
    ex = make_executor("cuda", "sdxs", discriminator=HAVE_DISCRIMINATOR)
    with ex:
        images = ex.generate(PROMPTS[:2], [1, 2])
        assert [img.size for img in images] == [(512, 512)] * 2
        again = ex.generate(PROMPTS[:1], [1])
        assert np.abs(_pixels(again[0]) - _pixels(images[0])).mean() < 2.0
        mem = ex.memory()
        assert mem.kind == "cuda-allocated" and mem.peak_bytes >= mem.in_use_bytes > 0
        if HAVE_DISCRIMINATOR:
            conf = ex.score(images)
            assert conf.shape == (2,) and np.all((conf >= 0) & (conf <= 1))
    assert ex.memory().in_use_bytes < mem.in_use_bytes


@pytest.mark.cuda
def test_cuda_device_index_out_of_range():
    import torch

    with pytest.raises(DiffsimError, match="out of range"):
        make_executor("cuda", "sdxs", device=torch.cuda.device_count())
