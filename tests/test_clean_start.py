"""A clean start: workers that build their executors at the same time neither crash on diffusers' lazy
imports nor draw different "seeded" weights from the shared global torch RNG (issue 9, item 4).

Every worker of a model must hold the same weights, in every process and after every restart, so that a
prompt and seed give the same image and the same confidence whichever worker serves them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from backends import make_executor

MODEL = "sd-turbo"
ARCH = "test_efficientnet"
PROMPTS = ["a lighthouse at dusk", "a bowl of ramen"]
SEEDS = [11, 12]
THREADS = 4


def build(model: str = MODEL):
    ex = make_executor("cpu-tiny", model, discriminator_arch=ARCH)
    ex.load()
    return ex


def modules_of(ex) -> dict:
    """Every torch module of a loaded executor: the pipeline's components and the discriminator."""
    import torch

    parts = {name: part for name, part in ex._pipe.components.items() if isinstance(part, torch.nn.Module)}
    parts["discriminator"] = ex._discriminator.model
    return parts


def weights_digest(ex) -> str:
    """One hash of every tensor of every module, in a fixed order (compares builds across processes)."""
    h = hashlib.sha256()
    for name, module in sorted(modules_of(ex).items()):
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def assert_same_weights(a, b) -> None:
    import torch

    ma, mb = modules_of(a), modules_of(b)
    assert sorted(ma) == sorted(mb)
    for name in ma:
        sa, sb = ma[name].state_dict(), mb[name].state_dict()
        assert sorted(sa) == sorted(sb), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs"


def build_together(n: int = THREADS) -> list:
    """``n`` executors built on ``n`` threads released at once; re-raises the first builder's error."""
    barrier = threading.Barrier(n)
    built: list = [None] * n
    errors: list = []

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=60)  # a failure guard: the threads start in milliseconds
            built[i] = build()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)  # a failure guard (a hung builder fails the test below instead of hanging it)
    assert not any(t.is_alive() for t in threads), "a builder did not finish"
    if errors:
        raise errors[0]
    return built


def test_executors_built_at_once_have_the_same_weights_images_and_confidences(torch_one_thread):
    executors = build_together()
    first = executors[0]
    images0 = first.generate(PROMPTS, SEEDS)
    conf0 = first.score(images0)
    for other in executors[1:]:
        assert_same_weights(first, other)
        images = other.generate(PROMPTS, SEEDS)
        for x, y in zip(images0, images):
            assert np.array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(conf0, other.score(images))


def test_weights_do_not_depend_on_the_global_rng(torch_one_thread):
    torch = torch_one_thread
    reference = build()
    torch.manual_seed(12345)
    torch.rand(1000)  # someone else used the global RNG in between
    again = build()
    assert_same_weights(reference, again)
    torch.manual_seed(0)  # a build does not seed the global RNG either: draws after it still differ by seed
    build()
    after_build = torch.rand(4)
    torch.manual_seed(1)
    build()
    assert not torch.equal(after_build, torch.rand(4))


def test_different_seeds_and_models_get_different_weights(torch_one_thread):
    import torch

    a = make_executor("cpu-tiny", MODEL, discriminator=False, seed=0)
    b = make_executor("cpu-tiny", MODEL, discriminator=False, seed=1)
    a.load()
    b.load()
    wa = a._pipe.unet.state_dict()
    wb = b._pipe.unet.state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


_FRESH_PROCESS = """
import json, sys, threading
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_clean_start import build_together, weights_digest
print(json.dumps(sorted({{weights_digest(ex) for ex in build_together()}})))
"""


@pytest.mark.slow  # a fresh interpreter imports torch + diffusers (~10-30 s)
def test_a_fresh_process_builds_on_threads_without_import_errors_and_the_same_weights(torch_one_thread):
    """The ImportError came from diffusers' lazy imports racing in a process that had not imported them
    yet; the weights must also be the same after a restart (another process) as here."""
    from pathlib import Path

    code = _FRESH_PROCESS.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)  # a failure guard
    assert out.returncode == 0, out.stderr[-3000:]
    digests = json.loads(out.stdout.strip().splitlines()[-1])
    assert digests == [weights_digest(build())]
