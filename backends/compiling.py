"""``torch.compile`` for a pipeline's UNet, one model at a time, and a check that it really ran compiled.

What went wrong (``diffsim profile --compile`` over the five models in one process): dynamo keeps its
compiled code per *code object*, and every UNet's forward is the same code object,
``UNet2DConditionModel.forward``. Each model (another architecture) and each new batch shape added entries
to that one cache until ``torch._dynamo.config.recompile_limit`` (8) was reached, during SD v1.5; from then
on dynamo ran that frame eagerly, with one warning in the log, so SDXL-Lightning and SDXL were measured
eager under a profile that said "compiled" (torch.compile's own docstring: "compile caches are per code
object ... at which point we will fall back to eager").

What this module does instead:

* **One model's cache at a time.** Compiling a UNet when no other compiled UNet is live in the process
  first calls ``torch._dynamo.reset()``, so each model of a profile starts with an empty cache. (Two
  compiled models live at once, a server's light and heavy, share it: a handful of entries.)
* **A dynamic batch dimension.** A pre-hook on the UNet marks dimension 0 of its batched inputs
  (``torch._dynamo.maybe_mark_dynamic``), so batch sizes 2..32 share one compiled graph instead of
  recompiling on the second size seen. Size 1 is still specialised by dynamo (one more entry), and under
  ``mode="reduce-overhead"`` each shape still records its own CUDA graph: that is per-shape replay, not
  recompilation.
* **The truth.** :class:`CompileWatch` counts the UNet's calls, and the eager runs of its first and last
  layers (``conv_in``, ``conv_out``): a hook on each counts only when it runs as Python, outside dynamo's
  tracing. In a compiled graph the hooks were traced once and never run again; after a fallback to eager
  they run on every call (the last layer's also catches a fallback of the code after a graph break).
  The executor turns any eager run into an error, so a result labelled "compiled" was compiled.

The compile options are :data:`COMPILE_OPTIONS`; the tests swap in dynamo's ``eager`` backend, which goes
through the same frames, guards and recompile limits but skips code generation (inductor takes minutes
per tiny UNet on a CPU).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

# What torch.compile is called with. "reduce-overhead": inductor plus CUDA graphs (at small batch, eager
# diffusers is bound by the host's kernel launches; see backends/cuda.py).
COMPILE_OPTIONS: dict[str, Any] = {"mode": "reduce-overhead"}

# The CompileWatch of every compiled UNet still loaded in this process (weak: an executor dropped without
# unload() leaves the set when it is collected).
_live: "weakref.WeakSet[CompileWatch]" = weakref.WeakSet()
_live_lock = threading.Lock()


class CompileWatch:
    """Counts of one compiled UNet: ``calls`` (every forward) and ``eager_runs`` (runs of its first or last
    layer that dynamo did not run as compiled code). Keeps the hook handles so :meth:`release` can remove
    them."""

    def __init__(self, model: str):
        self.model = model
        self.calls = 0
        self.eager_runs = 0
        self._handles: list = []

    def describe(self) -> str:
        return f"{self.model}: {self.calls} UNet calls, {self.eager_runs} eager runs of its first or last layer"

    def release(self) -> None:
        """Remove the hooks and leave the process-wide set of live compiled UNets."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with _live_lock:
            _live.discard(self)


def compile_unet(pipe, model: str) -> CompileWatch:
    """Replace ``pipe.unet`` by its compiled form (see the module docstring) and return its watch."""
    import torch

    watch = CompileWatch(model)
    with _live_lock:
        if not _live:
            torch._dynamo.reset()  # an empty cache for this model: no entries left by the previous one
        _live.add(watch)
    unet = pipe.unet

    @torch.compiler.disable  # runs as plain Python before dynamo takes the forward frame
    def before_forward(module, args, kwargs):
        watch.calls += 1
        sample = args[0] if args else kwargs.get("sample")
        _mark_batch_dynamic(torch, sample)
        _mark_batch_dynamic(torch, kwargs.get("encoder_hidden_states"))
        for value in (kwargs.get("added_cond_kwargs") or {}).values():
            _mark_batch_dynamic(torch, value)
        return None

    def after_layer(module, inputs, output):
        # Traced by dynamo (is_compiling() is True then, so nothing is counted) and absent from the compiled
        # graph; it runs as Python, and counts, only when the layer runs eagerly.
        if not torch.compiler.is_compiling():
            watch.eager_runs += 1

    watch._handles.append(unet.register_forward_pre_hook(before_forward, with_kwargs=True))
    watch._handles.append(unet.conv_in.register_forward_hook(after_layer))
    watch._handles.append(unet.conv_out.register_forward_hook(after_layer))
    pipe.unet = torch.compile(unet, **COMPILE_OPTIONS)
    return watch


def _mark_batch_dynamic(torch, value) -> None:
    if torch.is_tensor(value) and value.dim() > 0:
        torch._dynamo.maybe_mark_dynamic(value, 0)
