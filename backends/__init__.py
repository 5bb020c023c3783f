"""Model executors: load a diffusion model, generate a batch of images, score them with the discriminator.

``make_executor("cuda" | "cpu-tiny", model, weights=...)`` builds one; both backends share one code path
(:class:`backends.base.PipelineExecutor`) and differ in model size, dtype and device. Importing this package
imports neither torch nor diffusers.
"""

from .base import Executor, MemoryUsage
from .registry import BACKENDS, ExecutorConfig, executor_from_config, make_executor
from .specs import MODEL_NAMES, ModelSpec, get_spec

__all__ = [
    "BACKENDS",
    "MODEL_NAMES",
    "Executor",
    "ExecutorConfig",
    "MemoryUsage",
    "ModelSpec",
    "executor_from_config",
    "get_spec",
    "make_executor",
]
