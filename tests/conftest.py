"""Shared fixtures: tiny diffusion pipelines saved to disk, and the ``cuda`` marker's skip rule.

torch is imported only inside fixtures and hooks that need it, so tests of the torch-free core never load it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# In CI the property tests draw the same examples every run, so a submission's result does not depend on
# luck; on a developer's machine they explore new examples each run (and keep failures in .hypothesis/).
# Neither profile has a per-example deadline (hypothesis's default is 200 ms) or the too-slow health check:
# both fail a test only on a slow or loaded machine. Both profiles are built on hypothesis's own default
# explicitly: hypothesis loads its "ci" profile by itself whenever CI is in the environment, even empty.
_SPEED_INDEPENDENT = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", settings.get_profile("default"), **_SPEED_INDEPENDENT)
settings.register_profile("ci", settings.get_profile("default"), derandomize=True, print_blob=True, database=None,
                          **_SPEED_INDEPENDENT)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        for item in cuda_items:
            item.add_marker(skip)


# Only tests marked ``cuda`` may skip (on a machine without a GPU). Any other skip -- an importorskip whose
# package broke, a skipif that became true -- would hide a test silently, so it fails the run instead.
# DIFFSIM_ALLOW_SKIPS=1 lifts the rule for a developer who runs part of the suite without some extra.
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "cuda" not in report.keywords:
        _unexpected_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and not os.environ.get("DIFFSIM_ALLOW_SKIPS"):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{len(_unexpected_skips)} test(s) skipped that must run here (only `cuda` tests "
                                f"may skip): {', '.join(_unexpected_skips[:5])}", red=True)
        if session.exitstatus == 0:
            session.exitstatus = 1


@pytest.fixture(scope="session")
def torch_one_thread():
    """torch on one CPU thread: the CI machines have two cores shared by everything."""
    import torch

    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, torch_one_thread):
    """``tiny_pipeline_dir(model)`` -> a directory holding that model's tiny random-weight pipeline, written
    by ``save_pretrained`` (built once per session and model). Load it with
    ``make_executor("cpu-tiny", model, weights=str(path))``."""
    from backends.pipelines import build_pipeline
    from backends.specs import get_spec

    built: dict[str, Path] = {}

    def get(model: str = "sd-turbo") -> Path:
        if model not in built:
            path = tmp_path_factory.mktemp(f"tiny-{model}")
            build_pipeline(get_spec(model, "tiny"), "random").save_pretrained(path)
            built[model] = path
        return built[model]

    return get


@pytest.fixture(scope="module")
def small_inception():
    """Inception at 75 px input instead of 299 (about 16x less CPU), for every extractor built while it
    is active — the commands' too, so their figures stay comparable with the tests' own."""
    import diffsim.quality.features as features

    class SmallInput(features.InceptionFeatures):
        def __init__(self, weights, **kwargs):
            kwargs.setdefault("input_size", 75)
            super().__init__(weights, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "InceptionFeatures", SmallInput)
        yield


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory, torch_one_thread):
    """A seeded random-weight Inception saved once per session (no weights can be downloaded here)."""
    from diffsim.quality.features import save_random_inception

    path = tmp_path_factory.getbasetemp() / "inception-random-seed0.safetensors"
    if not path.exists():
        save_random_inception(path, seed=0)
    return path
