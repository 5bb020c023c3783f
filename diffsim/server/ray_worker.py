"""Workers as Ray actors: one per GPU on any node of a Ray cluster, behind the engine's WorkerHandle.

``diffsim serve --ray ADDRESS`` keeps the engine -- queues, routing, batching, deadlines, plans, HTTP --
in one process and places its workers as Ray actors across the cluster: Ray gives placement, transport
and failure detection, nothing of the policy. Ray Serve's router and autoscaler are not used: they
cannot express a threshold, a batch size or an in-place light/heavy role switch.

* **Placement.** One actor per worker, asking for one GPU (``--backend cuda``; Ray then makes that GPU
  the actor's ``cuda:0``) or one ``diffsim_cpu_slot`` (``cpu-tiny``: a custom resource each node offers,
  ``ray start --resources '{"diffsim_cpu_slot": 4}'``; ``--ray local`` offers one per worker). The actor
  hosts a :class:`~diffsim.server.worker.WorkerCore`, the same code a thread worker runs, which builds
  its executors on that node: the model weights must be reachable from every node (a hub id, or the
  same local path on each).
* **Loss.** A call to an actor that died, or whose node died, raises one of Ray's actor or system errors:
  the handle turns it into :class:`~diffsim.server.worker.WorkerLost`, and the engine serves the batch
  elsewhere and takes the worker out (:mod:`diffsim.runtime.health`). An exception raised by the
  executor inside the actor is the executor's: it fails that batch only, as on a thread.
* **Return.** Actors are created with ``max_restarts`` (default -1: always): Ray restarts a dead actor,
  on another node if its own is gone, as soon as the cluster has room. The engine's probe
  (:meth:`RayWorker.probe`) reloads its models and runs one batch, and the worker is back in the plan. An
  actor Ray has given up on (its restarts used up) is replaced by a new one.

Only this module imports Ray, and only when ``--ray`` is given.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Callable, Optional, Sequence

import ray
from ray import exceptions as ray_errors

from ..errors import DiffsimError
from .worker import BatchJob, BatchResult, WorkerCore, WorkerInfo, WorkerLost

CPU_SLOT = "diffsim_cpu_slot"  # the custom resource a cpu-tiny (or fake) worker takes on a node

# Errors that mean the actor or its node is gone, not that the executor raised.
_GONE = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.LocalRayletDiedError,
    ray_errors.ObjectLostError,
    ray_errors.ActorUnschedulableError,
)


class WorkerActor:
    """What runs inside the actor's process: a :class:`WorkerCore` and where it lives."""

    def __init__(self, index: int, make_executor: Callable[[str], object], swap: bool, device: str):
        self.core = WorkerCore(index, make_executor, swap=swap,
                               device=f"{socket.gethostname()}/{device} (pid {os.getpid()})")

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def start(self, initial_role: Optional[str]) -> WorkerInfo:
        return self.core.start(initial_role)

    def prepare(self, role: str) -> WorkerInfo:
        return self.core.prepare(role)

    def run(self, job: BatchJob) -> BatchResult:
        return self.core.run(job)

    def probe(self) -> WorkerInfo:
        return self.core.probe()

    def measure(self, batch_sizes: Sequence[int], warmup: int, iters: int) -> dict:
        return self.core.measure(batch_sizes, warmup, iters)

    def stop(self) -> None:
        self.core.stop()


def actor_options(backend: str, max_restarts: int) -> dict:
    """Resources and fault-tolerance options of a worker actor."""
    options: dict = {"max_restarts": max_restarts, "max_task_retries": 0, "max_concurrency": 1}
    if backend == "cuda":
        options["num_gpus"] = 1
    else:
        options["num_cpus"] = 0
        options["resources"] = {CPU_SLOT: 1}
    return options


class RayWorker:
    """A worker handle whose worker is a Ray actor (same async interface as :class:`ThreadWorker`).

    ``make_executor(role)`` is shipped to the actor (cloudpickle) and called there; on ``cuda`` it must
    build on device 0, the GPU Ray gave the actor.
    """

    def __init__(self, index: int, make_executor: Callable[[str], object], *, backend: str, swap: bool = False,
                 max_restarts: int = -1):
        self.index = index
        self.device = "cuda:0" if backend == "cuda" else f"cpu-slot-{index}"
        self._args = (index, make_executor, swap, self.device)
        self._options = actor_options(backend, max_restarts)
        self._actor = self._create()

    def _create(self):
        return ray.remote(WorkerActor).options(**self._options).remote(*self._args)

    async def _call(self, method: str, *args):
        try:
            return await getattr(self._actor, method).remote(*args)
        except _GONE as e:
            raise WorkerLost(f"worker {self.index} (Ray actor): {type(e).__name__}: {_first_line(e)}") from None
        except ray_errors.RayTaskError as e:  # the executor raised inside the actor: its error, not a loss
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise RuntimeError(_first_line(e)) from None

    async def where(self) -> dict:
        return await self._call("where")

    async def start(self, initial_role: Optional[str] = None) -> WorkerInfo:
        return await self._call("start", initial_role)

    async def prepare(self, role: str) -> WorkerInfo:
        return await self._call("prepare", role)

    async def run(self, job: BatchJob) -> BatchResult:
        return await self._call("run", job)

    async def measure(self, batch_sizes: Sequence[int], warmup: int = 1, iters: int = 3) -> dict:
        return await self._call("measure", tuple(batch_sizes), warmup, iters)

    async def probe(self) -> WorkerInfo:
        """The actor answers again (Ray restarted it: a fresh process without models) -> load its models
        and run one batch. An actor that died for good (``ActorDiedError``: Ray will not restart it) is
        replaced by a new one, which the next probe finds."""
        try:
            return await self._actor.probe.remote()
        except ray_errors.ActorDiedError as e:
            ray.kill(self._actor, no_restart=True)
            self._actor = self._create()
            raise WorkerLost(f"worker {self.index} (Ray actor) died for good, replaced: {_first_line(e)}") from None
        except _GONE as e:
            raise WorkerLost(f"worker {self.index} (Ray actor): {type(e).__name__}: {_first_line(e)}") from None
        except ray_errors.RayTaskError as e:
            raise RuntimeError(_first_line(e)) from None

    async def stop(self) -> None:
        try:
            await self._call("stop")
        except Exception:  # noqa: BLE001 - stopping a worker that is already gone is not an error
            pass
        finally:
            ray.kill(self._actor, no_restart=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- connecting to a cluster -------------------------------------------------------------------------------


def connect(address: str, *, backend: str, workers: int) -> bool:
    """Connect this process to Ray: ``local`` starts a private one-node cluster (resources for ``workers``
    cpu-tiny slots, or the machine's GPUs; no dashboard; a temp dir of its own so that it never mixes with
    another cluster on the machine); ``auto`` joins the cluster running here (``ray start --head``);
    ``host:port`` joins that cluster's head. Returns True when it started a cluster (call
    :func:`disconnect` to stop it). Already connected: nothing to do."""
    if ray.is_initialized():
        return False
    global _local_temp
    kwargs: dict = {"logging_level": "warning", "log_to_driver": False}
    started = address == "local"
    try:
        if started:
            temp = _local_temp = tempfile.mkdtemp(prefix="diffsim-ray-")
            os.environ.setdefault("RAY_TMPDIR", temp)  # Ray's address file goes here, not to /tmp/ray
            kwargs.update(address="local", include_dashboard=False, _temp_dir=os.path.join(temp, "ray"),
                          object_store_memory=256 * 2**20)
            if backend != "cuda":
                kwargs["resources"] = {CPU_SLOT: workers}
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise DiffsimError(f"--ray {address}: cannot connect to a Ray cluster: {_first_line(e)}") from None
    return started


def check_capacity(address: str, backend: str, workers: int) -> None:
    """Refuse at once (one line) when the cluster cannot place every worker, instead of waiting forever."""
    resource = "GPU" if backend == "cuda" else CPU_SLOT
    have = int(ray.cluster_resources().get(resource, 0))
    if have < workers:
        hint = ("start each GPU node with `ray start --address HEAD:PORT`" if backend == "cuda" else
                f"start nodes with `ray start ... --resources '{{\"{CPU_SLOT}\": N}}'`")
        raise DiffsimError(f"--ray {address}: the cluster offers {have} {resource} but --gpus {workers} needs "
                           f"{workers} ({hint})")


_local_temp: Optional[str] = None  # the temp dir of the cluster connect("local") started


def disconnect() -> None:
    """Leave the cluster; one that :func:`connect` started is shut down and its temp dir removed."""
    global _local_temp
    if ray.is_initialized():
        ray.shutdown()
    if _local_temp is not None:
        import shutil

        shutil.rmtree(_local_temp, ignore_errors=True)
        _local_temp = None
