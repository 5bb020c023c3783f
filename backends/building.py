"""Building models from several worker threads at once, and seeding random weights without the global RNG.

A server starts all its workers together, each on a thread of its own, and each builds its executors.
Two things went wrong when they did so at the same time:

* **Imports.** diffusers and transformers import their classes lazily, on first attribute access. Two
  threads asking for ``diffusers.StableDiffusionPipeline`` at once can meet inside a half-initialised
  module, and one of them gets ``ImportError: cannot import name 'StableDiffusionPipeline'``.
  ``from_pretrained`` also swaps process-wide state while it runs (it patches ``torch.nn.init`` and
  ``nn.Module.register_parameter`` to skip initialisation), which would corrupt a model being built by
  another thread. :data:`BUILD_LOCK` makes the imports and the construction of models one at a time;
  moving the weights to the device and running them are not under it.
* **Random weights.** Modules initialise their parameters from the process-wide torch RNG. Seeding it and
  building (even inside ``torch.random.fork_rng``) gives "seeded" weights only when nothing else draws
  from it meanwhile; two workers building at once interleave their draws and get different weights, hence
  different images and different confidences for the same prompt. :func:`seed_weights` therefore
  overwrites every randomly initialised parameter with values from a private ``torch.Generator`` seeded
  from (model, seed, parameter name): the same on every worker, in every process, whatever the global
  RNG holds. The global RNG is never seeded; construction may still draw from it, but what it draws is
  thrown away.

* **Casting.** ``.to(dtype=...)`` on a diffusers model (``ModelMixin.to``) logs "There are modules in
  UNet2DConditionModel that should be kept in float32: [] ..." on every call, even when the model lists no
  such module (its list defaults to ``[]``, which it tests against None): a 2-worker cpu-tiny server
  printed it 8 times (UNet and VAE of two models on two workers), for casts to the dtype the weights
  already had. :func:`cast_dtype` casts the way ``from_pretrained(torch_dtype=...)`` loads -- the modules
  a model names in ``_keep_in_fp32_modules`` stay float32, the rest take the dtype -- without going
  through that method, so nothing is logged and nothing is hidden. diffusers' own SDXL pipeline casts
  its VAE with ``.to`` around every fp16 decode (two such lines per batch); that call is not ours to
  change, so :func:`import_model_libraries` filters exactly that message, when its list is empty.

Importing this module imports no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Re-entrant: build_pipeline holds it while it calls build_random_components, which takes it too.
BUILD_LOCK = threading.RLock()


def import_model_libraries() -> None:
    """Import, under :data:`BUILD_LOCK`, every lazily loaded class a build touches, so that workers
    starting together find them already imported (see the module docstring); and filter diffusers'
    empty float32 warning (:class:`EmptyFp32ListFilter`)."""
    with BUILD_LOCK:
        _filter_empty_fp32_warning()
        import diffusers  # noqa: F401
        import timm  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import (  # noqa: F401
            AutoencoderKL,
            AutoencoderTiny,
            EulerDiscreteScheduler,
            PNDMScheduler,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
            UNet2DConditionModel,
        )
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: F401
        from transformers import (  # noqa: F401
            CLIPConfig,
            CLIPImageProcessor,
            CLIPTextConfig,
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )


class EmptyFp32ListFilter(logging.Filter):
    """Drops diffusers' "There are modules in X that should be kept in float32: []. Casting directly with
    `to()` ..." when the list is empty: ``ModelMixin.to`` logs it on every dtype cast whatever the model
    keeps in float32 (nothing, for every model built here), and SDXL's pipeline casts its VAE that way
    twice per fp16 batch. Our own casts avoid the call (:func:`cast_dtype`); this one is diffusers'.
    The same message with modules in its list still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in ") and "should be kept in float32: []." in message)


DIFFUSERS_MODEL_LOGGER = "diffusers.models.modeling_utils"  # where ModelMixin.to logs


def _filter_empty_fp32_warning() -> None:
    """Install :class:`EmptyFp32ListFilter` on diffusers' model logger, once per process."""
    logger = logging.getLogger(DIFFUSERS_MODEL_LOGGER)
    if not any(isinstance(f, EmptyFp32ListFilter) for f in logger.filters):
        logger.addFilter(EmptyFp32ListFilter())


def parameter_seed(name: str, seed: int, parameter: str) -> int:
    """A 63-bit generator seed for one parameter of one model: stable across processes and machines
    (a hash of the text, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{name}\0{int(seed)}\0{parameter}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_weights(module: "torch.nn.Module", name: str, seed: int) -> "torch.nn.Module":
    """Overwrite ``module``'s randomly initialised parameters with values drawn from private generators,
    one per parameter, seeded by :func:`parameter_seed` (``name`` says which model and part).

    A floating-point parameter whose elements are all equal was set by its constructor (norm weights of
    one, zero biases, zero-initialised layers) and is kept: it is already the same everywhere. Every other
    one is random and is redrawn from N(0, 1/fan_in), fan_in being the inputs per output unit of the
    module's weight (for a 1-d parameter, of its module's weight, or its own length): the scale PyTorch's
    default initialisers keep activations in range with, whatever library built the module. Buffers are
    left alone (batch-norm statistics, position ids: none of them random), and so are parameters on the
    meta device (shape-only builds have no values). Returns ``module``.
    """
    import torch

    with torch.no_grad():
        for module_name, owner in module.named_modules():
            own = list(owner.named_parameters(recurse=False))
            weight_fan = None
            for _, p in own:
                if p.dim() >= 2:
                    weight_fan = p[0].numel()
                    break
            for param_name, p in own:
                if not p.is_floating_point() or p.is_meta or _constant(p):
                    continue  # meta: a shape-only build (no values to seed)
                fan_in = p[0].numel() if p.dim() >= 2 else (weight_fan or p.numel())
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                generator = torch.Generator(device=p.device).manual_seed(parameter_seed(name, seed, full_name))
                p.normal_(0.0, fan_in ** -0.5, generator=generator)
    return module


def _constant(p: "torch.Tensor") -> bool:
    """All elements equal (a single element counts: no model built here has a random scalar parameter)."""
    flat = p.detach().reshape(-1)
    return bool((flat == flat[0]).all())


def cast_dtype(module: "torch.nn.Module", dtype: "torch.dtype") -> "torch.nn.Module":
    """Cast ``module``'s floating-point parameters and buffers to ``dtype`` in place, but those under a
    module the model keeps in float32 (diffusers' ``_keep_in_fp32_modules``: a parameter whose dotted
    name has one of them as a part, the rule ``from_pretrained`` loads by). Returns ``module``.

    What ``module.to(dtype=dtype)`` does for a model that keeps nothing in float32, without diffusers'
    warning on every such call (see the module docstring); right for any ``torch.nn.Module``.
    """
    import torch

    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if keep and keep.intersection(name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
    return module
