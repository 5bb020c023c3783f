"""The CUDA path right the first time it meets a GPU (issue 16), checked on the CPU with the tiny models:
an OOM in SDXL's decode followed by a successful call, scheduler overrides that survive a config lacking
them, hub ids and fp16 variants, SDXL-Lightning's UNet from any source, torch.compile across the five
models, PNG encoding off the worker's thread, skip-after-OOM in the server's measurement, and the
discriminator's normalisation. What only a GPU can show is in the ``cuda`` tests at the end (they skip
here) and in ``benchmarks/gpu_smoke.py``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from backends import MODEL_NAMES, get_spec, make_executor
from backends.base import PipelineExecutor, from_png, to_png
from backends.pipelines import WeightsSource, check_schedule, parse_weights, scheduler_for, weights_variant
from diffsim.errors import DiffsimError, InputError

PROMPTS = ["a lighthouse at dusk", "a bowl of ramen"]
LIGHTNING_FILE = "sdxl_lightning_2step_unet.safetensors"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------------------
# 1. One OOM in SDXL's decode no longer poisons the worker


def test_an_oom_in_the_sdxl_decode_is_followed_by_a_successful_call(torch_one_thread):
    """fp16 tiny SDXL on the CPU: the pipeline upcasts its VAE to fp32 for the decode; the decode runs out
    of memory (simulated); the next call must work, with the VAE back in fp16 and the same images."""
    torch = torch_one_thread
    ex = PipelineExecutor(get_spec("sdxl", "tiny"), backend="cpu-tiny", dtype="fp16", discriminator=False)
    before = ex.generate(PROMPTS, [1, 2])
    vae = ex._pipe.vae
    assert vae.dtype == torch.float16 and vae.config.force_upcast

    def out_of_memory(*args, **kwargs):
        assert vae.dtype == torch.float32  # the pipeline upcast it for this decode
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 110.00 GiB")

    vae._decode = out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ex.generate(PROMPTS, [1, 2])
    del vae._decode
    assert vae.dtype == torch.float16  # restored (it stayed fp32 before: every later call failed)
    after = ex.generate(PROMPTS, [1, 2])
    for x, y in zip(before, after):
        assert np.array_equal(pixels(x), pixels(y))


def test_the_server_measurement_skips_larger_batches_after_an_oom():
    """measure_profile (serve --gpu-profile measure) stops growing a model's batch after an OOM, as
    diffsim profile does: the larger sizes are null and never run."""
    from diffsim.server.worker import WorkerCore
    from backends.fake import FixedLatencyExecutor

    class RunsOutAt4(FixedLatencyExecutor):
        def __init__(self, model):
            super().__init__(model)
            self.sizes = []
            self.spec = type("Spec", (), {"resolution": 8})()
            self.device = "cpu"

        def generate(self, prompts, seeds):
            self.sizes.append(len(prompts))
            if len(prompts) >= 4:
                raise MemoryError("out of memory")
            return super().generate(prompts, seeds)

        def score(self, images):
            self.sizes.append(-len(images))  # negative: a discriminator batch
            if len(images) >= 4:
                raise MemoryError("out of memory")
            return super().score(images)

        def reset_peak_memory(self):
            pass

        def memory(self):
            from backends.base import MemoryUsage

            return MemoryUsage("cpu", "process-rss", 1, None)

    made = {}
    core = WorkerCore(0, lambda role: made.setdefault(role, RunsOutAt4(f"{role}-model")))
    core.start(None)
    result = core.measure((1, 2, 4, 8, 16), warmup=0, iters=1)
    for role in ("light", "heavy"):
        table = result["models"][f"{role}-model"]
        assert table["p50_ms"][:2] != [None, None] and table["p50_ms"][2:] == [None, None, None]
        assert max(made[role].sizes) == 4  # 8 and 16 were not attempted
    assert result["discriminator"]["p50_ms"][2:] == [None, None, None]
    assert min(made["light"].sizes) == -4


# ----------------------------------------------------------------------------------------------
# 3. Scheduler overrides survive a config that lacks them


EXPECTED_FIRST_TIMESTEPS = {  # model: (number of timesteps, the first three)
    "sd-turbo": (1, [999]),
    "sdxs": (1, [999]),
    "sd-v1.5": (51, [981, 961, 961]),  # PNDM without its Runge-Kutta warm-up (skip_prk_steps)
    "sdxl-lightning": (2, [999, 499]),
    "sdxl": (50, [981, 961, 941]),  # leading spacing, steps_offset 1
}


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_scheduler_overrides_survive_a_config_that_lacks_them(model):
    """A scheduler config read from disk lists the keys it lacked in ``_use_default_values``; diffusers drops
    those keys from a config dict, so overrides merged into the dict were lost (SD-Turbo ran at t=0).
    Built from such a config, every model's scheduler runs the spec's schedule."""
    import diffusers

    spec = get_spec(model)
    cls = getattr(diffusers, spec.scheduler)
    from_disk = cls.from_config(spec.scheduler_base)  # the base schedule only: no spacing, no PNDM flags
    overridden = set(spec.scheduler_overrides) & set(from_disk.config)  # the class's own settings
    assert overridden and overridden <= set(from_disk.config["_use_default_values"])
    scheduler = scheduler_for(spec, dict(from_disk.config))
    for key in overridden:
        assert scheduler.config[key] == spec.scheduler_overrides[key], key
    scheduler.set_timesteps(spec.steps)
    count, first = EXPECTED_FIRST_TIMESTEPS[model]
    assert len(scheduler.timesteps) == count
    assert [round(float(t)) for t in scheduler.timesteps[:3]] == first
    check_schedule(spec, scheduler)


def test_a_few_step_model_that_would_start_at_a_low_timestep_is_refused():
    from diffusers import EulerDiscreteScheduler

    spec = get_spec("sd-turbo")
    linspace = EulerDiscreteScheduler.from_config(spec.scheduler_base, timestep_spacing="linspace")
    with pytest.raises(DiffsimError, match="starts at t=0 of 1000"):
        check_schedule(spec, linspace)


# ----------------------------------------------------------------------------------------------
# 2, 4, 5. Hub ids, fp16 variants, SDXL-Lightning's UNet from any source


def test_hub_sources_use_the_maintained_ids_and_fp16_variants(tmp_path):
    hub = {name: parse_weights("hub", get_spec(name)) for name in MODEL_NAMES}
    assert hub["sd-v1.5"].location == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert not any("runwayml" in source.location for source in hub.values())
    variants = {name: weights_variant(get_spec(name), source) for name, source in hub.items()}
    assert variants == {"sd-turbo": "fp16", "sdxs": None, "sd-v1.5": "fp16", "sdxl-lightning": "fp16",
                        "sdxl": "fp16"}
    # Another repo: its default files (diffusers refuses a variant a repo lacks).
    assert weights_variant(get_spec("sdxl"), parse_weights("someone/sdxl-finetune", get_spec("sdxl"))) is None
    # A directory: fp16 only when it holds fp16 variant files.
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    local = WeightsSource("local", str(tmp_path))
    assert weights_variant(get_spec("sdxl"), local) is None
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert weights_variant(get_spec("sdxl"), local) == "fp16"


def save_lightning_unet(path: Path, seed: int = 7) -> dict:
    """A tiny 'Lightning' UNet state dict (other weights than the base's) saved as the Lightning file."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from backends.building import seed_weights

    unet = seed_weights(UNet2DConditionModel(**get_spec("sdxl-lightning", "tiny").unet), "lightning", seed)
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.fixture(scope="module")
def lightning_base_dir(tmp_path_factory, torch_one_thread):
    """A tiny SDXL base pipeline saved with save_pretrained (no Lightning file in it)."""
    from backends.pipelines import build_pipeline

    path = tmp_path_factory.mktemp("sdxl-base")
    build_pipeline(get_spec("sdxl-lightning", "tiny"), "random").save_pretrained(path)
    return path


def test_a_local_sdxl_lightning_directory_runs_the_lightning_unet(lightning_base_dir, tmp_path, torch_one_thread):
    torch = torch_one_thread
    with pytest.raises(InputError, match=f"needs its own UNet: put {LIGHTNING_FILE}"):
        make_executor("cpu-tiny", "sdxl-lightning", weights=str(lightning_base_dir), discriminator=False).load()

    state = save_lightning_unet(tmp_path / LIGHTNING_FILE)
    (tmp_path / "with-file").mkdir()
    for part in lightning_base_dir.iterdir():
        (tmp_path / "with-file" / part.name).symlink_to(part, target_is_directory=part.is_dir())
    (tmp_path / "with-file" / LIGHTNING_FILE).symlink_to(tmp_path / LIGHTNING_FILE)
    ex = make_executor("cpu-tiny", "sdxl-lightning", weights=str(tmp_path / "with-file"), discriminator=False)
    ex.load()
    loaded = ex._pipe.unet.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert ex._pipe.scheduler.config.timestep_spacing == "trailing"
    assert len(ex.generate(PROMPTS[:1], [3])) == 1


def test_a_lightning_file_for_another_architecture_is_refused(lightning_base_dir, tmp_path, torch_one_thread):
    from safetensors.torch import save_file

    (tmp_path / "d").mkdir()
    for part in lightning_base_dir.iterdir():
        (tmp_path / "d" / part.name).symlink_to(part, target_is_directory=part.is_dir())
    save_file({"conv_in.weight": torch_one_thread.zeros(2, 2)}, str(tmp_path / "d" / "unet" / LIGHTNING_FILE))
    with pytest.raises(InputError, match="not a UNet for sdxl-lightning"):
        make_executor("cpu-tiny", "sdxl-lightning", weights=str(tmp_path / "d"), discriminator=False).load()


_HUB_LOAD = """
import json, torch
torch.set_num_threads(1)
from backends import make_executor
ex = make_executor("cpu-tiny", "sdxl-lightning", weights="hub", discriminator=False)
ex.load()
state = ex._pipe.unet.state_dict()
print(json.dumps({"digest": float(sum(v.double().sum() for v in state.values())),
                  "spacing": ex._pipe.scheduler.config.timestep_spacing,
                  "images": len(ex.generate(["a cat"], [1]))}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers
def test_sdxl_lightning_from_the_hub_loads_fp16_files_and_never_the_base_unet(lightning_base_dir, tmp_path):
    """The real hub path, offline, from a hub cache laid out as huggingface_hub writes it: the SDXL base
    repo holds only fp16 variant files (so loading works only if variant="fp16" is asked for) and no UNet
    weights at all (so it works only if the base UNet is never read), and the Lightning repo its file."""
    from backends.pipelines import build_pipeline

    cache = tmp_path / "hf" / "hub"

    def snapshot(repo: str) -> Path:
        root = cache / ("models--" + repo.replace("/", "--"))
        commit = "0" * 40
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(commit)
        (root / "snapshots" / commit).mkdir(parents=True)
        return root / "snapshots" / commit

    spec = get_spec("sdxl-lightning", "tiny")
    base = snapshot(spec.hub_id)
    build_pipeline(spec, "random").save_pretrained(base, variant="fp16")
    for weights in (base / "unet").glob("*.safetensors"):
        weights.unlink()
    assert not any((base / "text_encoder").glob("model.safetensors"))  # fp16 files only
    repo, filename = spec.unet_weights_file
    state = save_lightning_unet(snapshot(repo) / filename)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", _HUB_LOAD], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["spacing"] == "trailing" and got["images"] == 1
    assert got["digest"] == pytest.approx(float(sum(v.double().sum() for v in state.values())))


# ----------------------------------------------------------------------------------------------
# 6. torch.compile: one model's cache at a time, a dynamic batch, and no silent fallback


@pytest.fixture
def dynamo_eager_backend(monkeypatch, torch_one_thread):
    """Compile with dynamo's ``eager`` backend (same frames, guards and recompile limits; no code
    generation, which takes minutes per tiny UNet on a CPU) and a recompile limit of 1, so that any
    second entry for the UNet's forward -- another model's, or another batch size's -- falls back."""
    import backends.compiling as compiling

    torch = torch_one_thread
    monkeypatch.setattr(compiling, "COMPILE_OPTIONS", {"backend": "eager"})
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 1
    yield compiling
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


@pytest.mark.slow  # dynamo traces each tiny UNet (~10-20 s each on the 2-core machine)
def test_compile_runs_all_five_models_compiled_one_after_another(dynamo_eager_backend):
    """As diffsim profile --compile does: each model loaded, run at two batch sizes, unloaded, in one
    process. Before, all UNets shared one dynamo cache and the later models ran eagerly."""
    for model in MODEL_NAMES:
        ex = PipelineExecutor(get_spec(model, "tiny"), backend="cpu-tiny", discriminator=False, compile_unet=True)
        for batch in (2, 3):  # both dynamic: one compiled graph serves both
            assert len(ex.generate(PROMPTS[:1] * batch, list(range(batch)))) == batch
        watch = ex._compile_watch
        assert watch.calls > 0 and watch.eager_runs == 0, watch.describe()
        ex.unload()


def test_a_unet_that_runs_eagerly_under_compile_is_an_error(dynamo_eager_backend, monkeypatch):
    """The watch sees eager UNet calls: with compilation disabled outright every call is one, and the
    executor refuses the result instead of passing eager latencies off as compiled."""
    monkeypatch.setattr(dynamo_eager_backend, "COMPILE_OPTIONS", {"backend": "eager", "disable": True})
    ex = PipelineExecutor(get_spec("sd-turbo", "tiny"), backend="cpu-tiny", discriminator=False, compile_unet=True)
    with pytest.raises(DiffsimError, match="the UNet of sd-turbo ran eagerly"):
        ex.generate(PROMPTS[:1], [0])
    ex.unload()


# ----------------------------------------------------------------------------------------------
# 7. PNG encoding off the worker's thread, and counted in the server's measured profile


@pytest.mark.parametrize("mode,shape", [("RGB", (33, 17, 3)), ("RGBA", (5, 9, 4)), ("L", (7, 3)), ("P", (6, 6))])
def test_png_encoding_round_trips(mode, shape):
    from PIL import Image

    values = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(values) if mode in ("RGB", "RGBA", "L") else Image.fromarray(values, "L").convert("P")
    data = to_png(image)
    Image.open(io.BytesIO(data)).verify()  # CRCs and structure
    back = from_png(data)
    assert back.mode == image.mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_a_worker_encodes_its_pngs_on_the_encoding_threads_while_it_scores(monkeypatch):
    """The batch's images are encoded on the PNG threads, and encoding has begun before the discriminator
    returns (the fake's score waits for it: run() would hang, not pass, if it encoded after scoring)."""
    import backends.base as base
    from backends.fake import FixedLatencyExecutor
    from diffsim.server.worker import BatchJob, WorkerCore

    threads: list[str] = []
    encoding_started = threading.Event()
    real_to_png = base.to_png

    def recording_to_png(image):
        threads.append(threading.current_thread().name)
        encoding_started.set()
        return real_to_png(image)

    monkeypatch.setattr(base, "to_png", recording_to_png)

    class WaitsForEncoding(FixedLatencyExecutor):
        def score(self, images):
            assert encoding_started.wait(30), "no image was being encoded while the batch was scored"
            return super().score(images)

    core = WorkerCore(0, lambda role: WaitsForEncoding(f"{role}-model"))
    core.start(None)
    result = core.run(BatchJob("light", ("a", "b", "c"), (1, 2, 3), True))
    assert len(result.images_png) == 3 and len(threads) == 3
    assert all(name.startswith("diffsim-png") for name in threads)
    assert [from_png(p).getpixel((0, 0))[0] for p in result.images_png] == [1, 2, 3]
    core.stop()


def test_the_server_measurement_times_each_batch_with_its_png_encoding(monkeypatch):
    import backends.base as base
    from backends.fake import FixedLatencyExecutor
    from diffsim.server.worker import WorkerCore

    encoded = []
    real_to_png = base.to_png
    monkeypatch.setattr(base, "to_png", lambda image: encoded.append(1) or real_to_png(image))

    class Measurable(FixedLatencyExecutor):
        spec = type("Spec", (), {"resolution": 8})()
        device = "cpu"

        def reset_peak_memory(self):
            pass

        def memory(self):
            return base.MemoryUsage("cpu", "process-rss", 1, None)

    core = WorkerCore(0, lambda role: Measurable(f"{role}-model"))
    core.start(None)
    core.measure((1, 2), warmup=1, iters=2)
    assert len(encoded) == 2 * (1 + 2) * (1 + 2)  # both models, sizes 1 and 2, warm-up + 2 timed calls


# ----------------------------------------------------------------------------------------------
# 8. Ray: a cuda worker actor builds on device 0


def test_ray_workers_build_their_cuda_executors_on_device_0(monkeypatch):
    """Inside a Ray actor the one GPU Ray gave it is cuda:0, whatever the worker's index: the start-up
    hands the executor factory device 0 for every Ray worker on the cuda backend."""
    import diffsim.server.ray_worker as ray_worker
    from diffsim.server.startup import ServeOptions, make_workers

    made = []

    class RecordingWorker:
        def __init__(self, index, make_executor, **kwargs):
            self.index, self.make_executor = index, make_executor

    monkeypatch.setattr(ray_worker, "connect", lambda *a, **k: False)
    monkeypatch.setattr(ray_worker, "check_capacity", lambda *a, **k: None)
    monkeypatch.setattr(ray_worker, "RayWorker", RecordingWorker)
    options = ServeOptions(backend="cuda", cascade="sdturbo-sdv15", gpus=3, ray="local")
    workers = make_workers(options, lambda w, role, model: made.append((w, role, model)),
                           {"light": "sd-turbo", "heavy": "sd-v1.5"})
    for worker in workers:
        worker.make_executor("light")
        worker.make_executor("heavy")
    assert {w for w, _, _ in made} == {0} and len(made) == 6


# ----------------------------------------------------------------------------------------------
# 9. The discriminator's normalisation is its architecture's


def test_discriminator_normalisation_follows_timm_s_pretrained_config(tmp_path):
    from backends.discriminator import IMAGENET_MEAN, default_settings, normalisation, read_settings
    from backends.discriminator_training import TrainConfig, _training_settings

    assert normalisation("tf_efficientnetv2_s") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalisation("efficientnet_b0")[0] == IMAGENET_MEAN
    assert default_settings("tf_efficientnetv2_s").mean == (0.5, 0.5, 0.5)
    # Fine-tuning from timm's tf_efficientnetv2_s.in1k weights (a file without a settings file).
    init = tmp_path / "tf_efficientnetv2_s.in1k.safetensors"
    init.write_bytes(b"")
    settings = _training_settings(TrainConfig(arch="tf_efficientnetv2_s", init=init, image_size=224))
    assert (settings.mean, settings.std, settings.image_size) == ((0.5,) * 3, (0.5,) * 3, 224)
    # An earlier discriminator's settings file keeps its own normalisation.
    (tmp_path / "tf_efficientnetv2_s.in1k.json").write_text(json.dumps(
        {"arch": "tf_efficientnetv2_s", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}))
    assert _training_settings(TrainConfig(init=init)).mean == (0.1, 0.2, 0.3)
    # A settings file without mean/std: the arch's.
    (tmp_path / "old.json").write_text(json.dumps({"arch": "tf_efficientnetv2_s"}))
    assert read_settings(tmp_path / "old.json").std == (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# benchmarks/gpu_smoke.py: the first GPU run's one command


SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def test_gpu_smoke_refuses_cleanly_without_cuda(tmp_path):
    """Run as a script with no CUDA device visible: one line on stderr, exit status 2, nothing written."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(SMOKE), "--out", str(tmp_path / "smoke.json")], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "gpu_smoke: no CUDA device" in out.stderr
    assert not (tmp_path / "smoke.json").exists()


def test_gpu_smoke_imports_and_checks_its_arguments(monkeypatch, capsys, torch_one_thread):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    args = smoke.parse_args(["--only", "models,oom", "--compile", "--batch-sizes", "1,4"])
    assert args.sections == ["models", "oom", "compile"] and args.batch_sizes == [1, 4]
    assert args.models == list(MODEL_NAMES)
    for bad in (["--only", "everything"], ["--models", "sd-9"], ["--batch-sizes", "0"]):
        with pytest.raises(SystemExit) as e:
            smoke.parse_args(bad)
        assert e.value.code == 2
    monkeypatch.setattr(torch_one_thread.cuda, "is_available", lambda: False)
    assert smoke.main(["--only", "models"]) == smoke.REFUSED
    assert "no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# On a GPU (skipped without one)


@pytest.mark.cuda
def test_cuda_executor_on_a_device_index_above_0():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    ex = make_executor("cuda", "sdxs", device=1, discriminator=False)
    with ex:
        images = ex.generate(PROMPTS, [1, 2])
        assert [img.size for img in images] == [(512, 512)] * 2
        assert next(ex._pipe.unet.parameters()).device == torch.device("cuda:1")
        assert torch.cuda.memory_allocated(1) > 0


@pytest.mark.cuda
def test_cuda_fp16_sdxl_recovers_from_an_oom_in_its_decode():
    """Full-size SDXL-Lightning in fp16 (random weights): fp32 sliced decode, a simulated OOM there, then a
    normal batch again."""
    import torch

    ex = make_executor("cuda", "sdxl-lightning", discriminator=False)
    with ex:
        vae = ex._pipe.vae
        assert vae.dtype == torch.float16 and vae.use_slicing
        first = ex.generate(PROMPTS, [1, 2])

        def out_of_memory(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        vae._decode = out_of_memory
        with pytest.raises(torch.cuda.OutOfMemoryError):
            ex.generate(PROMPTS, [1, 2])
        del vae._decode
        assert vae.dtype == torch.float16
        again = ex.generate(PROMPTS, [1, 2])
        assert [img.size for img in again] == [(1024, 1024)] * 2
        assert np.abs(pixels(again[0]) - pixels(first[0])).mean() < 2.0


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_server_with_several_workers_answers(tmp_path):
    """Every GPU of the machine (up to 2) a worker of one server on the cuda backend, random weights."""
    import base64

    import httpx
    import torch

    from diffsim.server.http import HttpSettings
    from diffsim.server.startup import BackgroundServer, ServeOptions

    gpus = min(2, torch.cuda.device_count())
    options = ServeOptions(backend="cuda", cascade="sdturbo-sdv15", gpus=gpus, gpu_profile="a100",
                           batch_sizes=(1, 2, 4), slo_s=120.0)
    with BackgroundServer(options, HttpSettings(max_n=4)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            reply = client.post("/v1/images/generations", json={"prompt": "a red bus", "n": 2, "seed": 3})
            assert reply.status_code == 200, reply.text
            data = reply.json()["data"]
            assert len(data) == 2
            assert from_png(base64.b64decode(data[0]["b64_json"])).size == (512, 512)
