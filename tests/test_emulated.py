"""diffsim.server.emulation: profile-timed stand-in executors, and ``diffsim serve --backend emulated``."""

from __future__ import annotations

import pickle

import httpx
import numpy as np
import pytest

from diffsim.errors import DiffsimError
from diffsim.profiles import load_cascade
from diffsim.resources import profiles_dir, resolve_profile
from diffsim.server.emulation import EmulatedFactory
from diffsim.server.startup import BackgroundServer, ServeOptions, check_options


@pytest.fixture(scope="module")
def cascade():
    return load_cascade("sdturbo-sdv15", resolve_profile("a100"), profiles_dir() / "cascades.yaml")


def executors(cascade, sleeps):
    factory = EmulatedFactory(cascade, seed=3)
    light = factory(0, "light", cascade.light_model)
    heavy = factory(1, "heavy", cascade.heavy_model)
    for ex in (light, heavy):
        ex.sleep = sleeps.append
        ex.load()
    return light, heavy


def test_batches_take_the_profiles_p50_times(cascade):
    sleeps: list[float] = []
    light, heavy = executors(cascade, sleeps)
    images = light.generate(["a", "b", "c", "d"], [1, 2, 3, 4])
    light.score(images)
    heavy.generate(["a", "b"], [1, 2])
    assert sleeps == [cascade.light.latency_ms(4) / 1e3, cascade.discriminator.latency_ms(4) / 1e3,
                      cascade.heavy.latency_ms(2) / 1e3]
    assert len(images) == 4 and images[0].size == (8, 8)


def test_confidences_follow_the_deferral_curve_and_depend_only_on_prompt_and_seed(cascade):
    light, _ = executors(cascade, [])
    other, _ = executors(cascade, [])
    prompts = [f"prompt {i}" for i in range(4000)]
    scores = np.concatenate([light.score(light.generate(prompts[i:i + 4], list(range(i, i + 4))))
                             for i in range(0, len(prompts), 4)])
    again = other.score(other.generate(prompts[:4], [0, 1, 2, 3]))
    assert again.tolist() == scores[:4].tolist()  # same (prompt, seed): same confidence on another worker
    for t in (0.2, 0.5, 0.8):  # the fraction below t is f(t), up to sampling (sd of a fraction of 4000 < 0.008)
        assert abs(np.mean(scores < t) - cascade.deferral(t)) < 0.03
    changed = light.score(light.generate(prompts[:4], [10, 11, 12, 13]))
    assert changed.tolist() != scores[:4].tolist()  # another seed: another image, another score


def test_sizes_between_measured_ones_are_interpolated_as_the_simulator_reads_them(cascade):
    sleeps: list[float] = []
    light, _ = executors(cascade, sleeps)
    assert 3 not in cascade.light.batch_sizes  # the dispatcher forms a batch of 3 when 3 are queued
    light.generate(["a", "b", "c"], [1, 2, 3])
    assert sleeps == [cascade.light.latency_ms(3) / 1e3]
    assert cascade.light.latency_ms(2) < 1e3 * sleeps[0] < cascade.light.latency_ms(4)
    too_many = cascade.light.batch_sizes[-1] + 1
    with pytest.raises(DiffsimError, match=f"no sd-turbo time at batch size {too_many}"):
        light.generate(["a"] * too_many, list(range(too_many)))


def test_the_factory_pickles_and_checks_the_model(cascade):
    factory = EmulatedFactory(cascade)
    heavy = pickle.loads(pickle.dumps(factory))(0, "heavy", cascade.heavy_model)
    heavy.load()
    sleeps: list[float] = []
    heavy.sleep = sleeps.append
    heavy.generate(["a", "b"], [1, 2])
    assert sleeps == [cascade.heavy.latency_ms(2) / 1e3] and heavy.backend == "emulated"
    with pytest.raises(DiffsimError, match="light model is"):
        factory(0, "light", cascade.heavy_model)


def test_serve_refuses_measuring_an_emulated_profile():
    with pytest.raises(DiffsimError, match="takes its batch times from a profile"):
        check_options(ServeOptions(backend="emulated", cascade="sdturbo-sdv15", gpus=1, gpu_profile="measure"))


def test_serve_emulated_answers_with_deferral_metadata():
    options = ServeOptions(backend="emulated", cascade="sdturbo-sdv15", gpus=2, gpu_profile="a100")
    with BackgroundServer(options) as server:
        with httpx.Client(timeout=60) as client:
            answers = [client.post(f"{server.url}/v1/images/generations",
                                   json={"prompt": f"a cat number {i}", "n": 1, "seed": i}) for i in range(6)]
            plan = client.get(f"{server.url}/v1/plan").json()
    assert [a.status_code for a in answers] == [200] * 6
    records = [a.json()["data"][0] for a in answers]
    assert all(r["served_by"] in ("light", "heavy") and 0.0 <= r["confidence"] <= 1.0 for r in records)
    assert plan["gpu"] == "a100"
