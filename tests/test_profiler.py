"""``diffsim profile``: the measurement loop (with a fake executor), the YAML it writes, and its errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import yaml

from diffsim import cli
from diffsim.errors import DiffsimError
from diffsim.profiling.profiler import (
    ProfileSettings,
    Series,
    gpu_slug,
    profile_models,
    time_calls,
    validate_profile,
    weights_for,
    write_profile,
)
from diffsim.profiles import load_gpu_profile

HAVE_DISCRIMINATOR = importlib.util.find_spec("backends.discriminator") is not None


class FakeSpec:
    resolution = 8


class FakeClock:
    """A clock that moves only when a fake executor works: timings are the same on any machine."""

    def __init__(self):
        self.s = 0.0

    def __call__(self) -> float:
        return self.s


class FakeExecutor:
    """Stands in for a PipelineExecutor: runs out of memory at batch sizes >= ``oom_at``. Each call moves
    ``clock`` (when given) by 10 ms per image, so measured times are known exactly."""

    def __init__(self, model: str, oom_at: int = 10**9, clock: FakeClock | None = None):
        self.model, self.oom_at, self.spec, self.device = model, oom_at, FakeSpec(), "cpu"
        self.clock = clock
        self.calls: list[int] = []
        self.loaded = self.unloaded = False

    def load(self):
        self.loaded = True

    def unload(self):
        self.unloaded = True

    def generate(self, prompts, seeds):
        assert len(prompts) == len(seeds)
        self.calls.append(len(prompts))
        if len(prompts) >= self.oom_at:
            raise MemoryError("out of memory")
        self._work(len(prompts))
        return [None] * len(prompts)

    def score(self, images):
        self._work(len(images))
        return np.full(len(images), 0.5)

    def _work(self, n: int) -> None:
        if self.clock is not None:
            self.clock.s += 0.010 * n

    def reset_peak_memory(self):
        pass

    def synchronize(self):
        pass

    def memory(self):
        from backends.base import MemoryUsage

        return MemoryUsage(device="cpu", kind="process-rss", in_use_bytes=1, peak_bytes=None)


def test_series_percentiles_and_nulls():
    s = Series([1, 2, 4])
    s.add([10.0, 20.0, 30.0, 40.0], None)
    s.add(None, None)
    s.add([5.0], 1.5)
    table = s.to_table()
    assert table["p50_ms"] == [25.0, None, 5.0]
    assert table["p95_ms"][0] == pytest.approx(np.percentile([10, 20, 30, 40], 95))
    assert table["peak_mem_gib"] == [None, None, 1.5]
    cpu_only = Series([1])
    cpu_only.add([1.0], None)
    assert "peak_mem_gib" not in cpu_only.to_table()


def test_time_calls_counts_warmup_and_iterations():
    """On a fake clock: the k-th call takes k ms and a sync 0.25 ms. A timed sample is its call plus the
    sync after it (the work the call queued on the device), not the sync before it nor a warm-up."""
    clock = FakeClock()
    events: list[str] = []

    def call():
        events.append("call")
        clock.s += events.count("call") / 1000.0

    def sync():
        events.append("sync")
        clock.s += 0.25 / 1000.0

    samples = time_calls(call, sync, warmup=2, iters=3, clock=clock)
    assert samples == pytest.approx([3.25, 4.25, 5.25], abs=1e-9)
    assert events == ["call", "call", "sync"] + ["sync", "call", "sync"] * 3


def test_out_of_memory_is_null_and_profiling_goes_on():
    made: dict[str, FakeExecutor] = {}
    clock = FakeClock()

    def factory(model):
        made[model] = FakeExecutor(model, oom_at=4 if model == "big" else 10**9, clock=clock)
        return made[model]

    lines: list[str] = []
    models, disc = profile_models(factory, ["small", "big"], [1, 2, 4, 8], warmup=1, iters=2,
                                  progress=lines.append, clock=clock)
    assert models["small"].p50_ms == [10.0, 20.0, 40.0, 80.0]  # 10 ms per image on the fake clock
    assert models["big"].p50_ms[:2] != [None, None] and models["big"].p50_ms[2:] == [None, None]
    assert 8 not in made["big"].calls  # not attempted after the OOM at 4
    assert all(ex.loaded and ex.unloaded for ex in made.values())
    assert any("out of memory" in line for line in lines)
    assert sum("b=" in line and "discriminator" not in line for line in lines) == 8  # a line per measurement
    assert disc.p50_ms == [10.0, 20.0, 40.0, 80.0]
    profile = validate_profile({
        "gpu": "fake",
        "provenance": {"source": "test", "gpu": "fake", "date": "2025-01-01"},
        "models": {name: s.to_table() for name, s in models.items()},
        "discriminator": disc.to_table(),
    })
    assert profile.models["big"].max_batch_size() == 2


def test_gpu_slug_and_weights_mapping(tmp_path):
    for model in ("a", "b"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "model_index.json").write_text("{}")
    assert weights_for(str(tmp_path), ["a", "b"]) == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert weights_for("random", ["a", "b"]) == {"a": "random", "b": "random"}
    assert weights_for("b=/models/b", ["a", "b"]) == {"a": "random", "b": "/models/b"}
    with pytest.raises(DiffsimError, match="not one of the profiled models"):
        weights_for("c=/x", ["a", "b"])


def test_settings_are_checked():
    good = dict(backend="cpu-tiny", models=("sdxs",), batch_sizes=(1, 2), weights="random", warmup=0, iters=1)
    ProfileSettings(**good).check()
    for bad, match in [({"batch_sizes": (2, 1)}, "increasing"), ({"iters": 0}, "iters"),
                       ({"models": ("sdxs", "sdxs")}, "twice"), ({"batch_sizes": (0, 1)}, "positive")]:
        with pytest.raises(DiffsimError, match=match):
            ProfileSettings(**{**good, **bad}).check()


def test_write_profile_round_trips(tmp_path):
    profile = validate_profile({
        "gpu": "fake",
        "provenance": {"source": "test", "gpu": "Fake GPU", "date": "2025-01-01", "software": {"torch": "x"}},
        "models": {"sdxs": {"batch_sizes": [1, 2], "p50_ms": [1.5, None], "p95_ms": [2.0, None],
                            "p99_ms": [2.5, None], "peak_mem_gib": [0.5, None]}},
        "discriminator": {"batch_sizes": [1, 2], "p50_ms": [1.0, 1.2]},
    })
    path = write_profile(profile, tmp_path / "sub" / "fake.yaml")
    assert load_gpu_profile(path) == profile


@pytest.mark.skipif(not HAVE_DISCRIMINATOR, reason="backends.discriminator is not there yet")
def test_cli_profile_cpu_tiny_writes_a_loadable_profile(tmp_path, capsys, torch_one_thread):
    out = tmp_path / "cpu.yaml"
    rc = cli.main(["profile", "--backend", "cpu-tiny", "--models", "sdxs,sd-turbo", "--batch-sizes", "1,2",
                   "--warmup", "0", "--iters", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("[profile]") >= 2 * 2 + 2  # a line per model measurement and per discriminator batch
    profile = load_gpu_profile(out)
    assert profile.gpu == "cpu-tiny"
    assert set(profile.models) == {"sdxs", "sd-turbo"}
    for table in [*profile.models.values(), profile.discriminator]:
        assert table.batch_sizes == [1, 2]
        assert all(v is not None and v > 0 for v in table.p50_ms)
        assert table.peak_mem_gib is None  # CPU: no resettable peak
    software = profile.provenance.software
    assert {"torch", "diffusers", "transformers"} <= set(software) and software["backend"] == "cpu-tiny"
    assert yaml.safe_load(out.read_text())["provenance"]["date"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "tpu"], "--backend: invalid choice: 'tpu'"),
        (["--backend", "cpu-tiny", "--models", ""], "--models: give at least one value"),
        (["--backend", "cpu-tiny", "--models", "sdxs", "--batch-sizes", ""], "--batch-sizes: expected"),
        (["--backend", "cpu-tiny", "--models", "sdxs", "--iters", "0"], "--iters: must be an integer in"),
        (["--backend", "cpu-tiny", "--models", "sd-9"], "unknown model 'sd-9'"),
        (["--backend", "cpu-tiny", "--models", "sdxs", "--batch-sizes", "4,2"], "strictly increasing"),
        (["--backend", "cpu-tiny", "--models", "sdxs", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["--backend", "cpu-tiny", "--models", "sdxs", "--weights", "/no/such/dir"], "no such model directory"),
    ],
)
def test_cli_profile_bad_inputs_are_one_line_errors(argv, message, capsys, tmp_path):
    rc = cli.main(["profile", *argv, "--out", str(tmp_path / "x.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.yaml").exists()


def test_cli_profile_cuda_without_a_gpu(capsys, tmp_path, torch_one_thread):
    if torch_one_thread.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = cli.main(["profile", "--backend", "cuda", "--models", "sdxs", "--out", str(tmp_path / "x.yaml")])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


class ThreadClock(FakeClock):
    """A fake clock per thread: executors measured together each see only their own work."""

    def __init__(self):
        import threading

        self._local = threading.local()

    @property
    def s(self):
        return getattr(self._local, "s", 0.0)

    @s.setter
    def s(self, value):
        self._local.s = value


def test_concurrency_measures_every_copy_at_once_and_pools_the_samples():
    made: list[FakeExecutor] = []
    clock = ThreadClock()

    def factory(model, copy):
        made.append(FakeExecutor(f"{model}", oom_at=4 if copy == 1 else 10**9, clock=clock))
        return made[-1]

    models, disc = profile_models(factory, ["m"], [1, 2, 4], warmup=1, iters=3, progress=lambda line: None,
                                  clock=clock, concurrency=2)
    assert len(made) == 2 and all(ex.loaded and ex.unloaded for ex in made)
    assert models["m"].p50_ms == [10.0, 20.0, None]  # one copy ran out of memory at 4: null for the group
    assert made[0].calls.count(1) == 4 and made[1].calls.count(1) == 4  # 1 warm-up + 3 timed each
    assert disc.p50_ms == [10.0, 20.0, 40.0]


def test_a_server_s_workers_measured_together_make_one_profile():
    from diffsim.server.startup import merge_measurements

    table = lambda p50, p99: {"batch_sizes": [1, 2], "p50_ms": p50, "p95_ms": p50, "p99_ms": p99}  # noqa: E731
    a = {"models": {"x": table([10.0, 20.0], [12.0, 30.0])}, "discriminator": table([1.0, 2.0], [1.0, 2.0]),
         "load_s": {"light": 1.0, "heavy": 2.0}}
    b = {"models": {"x": table([14.0, None], [16.0, None])}, "discriminator": table([3.0, 2.0], [3.0, 4.0]),
         "load_s": {"light": 3.0, "heavy": 1.0}}
    merged = merge_measurements([a, b])
    assert merged["models"]["x"]["p50_ms"] == [12.0, None] and merged["models"]["x"]["p99_ms"] == [14.0, None]
    assert merged["discriminator"]["p99_ms"] == [2.0, 3.0]
    assert merged["load_s"] == {"light": 3.0, "heavy": 2.0}
