"""Where a query goes: which stage first, which worker of a stage, and whether it is deferred.

* The load balancer (:class:`Router`) picks one worker of a stage: uniformly at random, as in the
  DiffServe testbed (a seeded ``numpy.random.Generator`` is passed in), or the least-loaded one
  (fewest queued + in-flight queries; ties go to the lowest worker index). The dispatcher makes the
  least-loaded choice through a :class:`LoadIndex`, which it tells of every load change, so a choice
  costs O(log n) instead of a scan of the stage's n workers; :meth:`Router.choose` is the scan, the
  definition the index must agree with.
* :func:`first_stage`: in ``cascade`` mode every query starts at the light stage; in ``split`` mode a
  fraction ``light_share`` goes to light and the rest to heavy, decided per query by a stable hash of
  (query id, seed) -- the same query is routed the same way on every run.
* :func:`defers`: after the light batch and the discriminator, a query whose confidence is below the
  threshold goes on to the heavy stage.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from typing import Optional, Sequence

import numpy as np

from .confidence import STREAM_SPLIT, stable_uniform
from ..plan import Plan, Role

ROUTING_KINDS = ("random", "least-loaded")
_BLOCK = 1024


class Router:
    """Chooses a worker among a stage's workers."""

    def __init__(self, kind: str, rng: np.random.Generator):
        if kind not in ROUTING_KINDS:
            raise ValueError(f"unknown routing {kind!r} (choose from {', '.join(ROUTING_KINDS)})")
        self.kind = kind
        self.rng = rng
        # Uniform draws are taken from the generator in blocks: a scalar draw costs ~1 us, a list item
        # ~0.05 us. The sequence of draws is the generator's, so a seed still fixes every choice.
        self._draws: list[float] = []
        self._next = 0

    def choose(self, workers: Sequence[int], loads: Sequence[int]) -> int:
        """One of ``workers`` (a non-empty list of worker indices, ascending).

        ``loads[w]`` is worker w's queued + in-flight queries; only least-loaded routing reads it.
        """
        if self.kind == "random":
            n = len(workers)
            if n == 1:
                return workers[0]
            i = self._next
            if i == len(self._draws):
                self._draws = self.rng.random(_BLOCK).tolist()
                i = 0
            self._next = i + 1
            return workers[int(self._draws[i] * n)]
        best = workers[0]
        best_load = loads[best]
        for w in workers:
            load = loads[w]
            if load < best_load or (load == best_load and w < best):
                best, best_load = w, load
        return best


_WORKER_BITS = 32  # a LoadIndex heap entry is load << 32 | worker
_WORKER_MASK = (1 << _WORKER_BITS) - 1


class LoadIndex:
    """Each worker's load, and for each group of workers (a stage) its least-loaded member.

    Why: least-loaded routing by a scan reads every worker of the stage for every placement, which
    made it most of a large simulation's time (O(n) per placement with n workers). Here each group
    keeps a heap of (load, worker) entries: the smallest entry is the least-loaded worker, ties to
    the lowest index -- exactly the scan's choice. An entry goes stale when its worker's load changes
    (a new entry is pushed then); stale entries are dropped when they reach the top (lazy
    invalidation), so a change costs O(log n) and a choice O(log n) amortised. An entry is one int,
    ``load << 32 | worker``, which orders as the pair does: ints compare faster than tuples and take
    half the memory (at 1024 workers the heap's tuples made each placement slower by cache misses).

    The invariant that makes it exact: for every member w of a group, the entry of (load[w], w) is in
    the group's heap, and the heap holds entries of members only. :meth:`set` keeps the first half (every
    load change must come through it), :meth:`set_groups` the second (called whenever membership
    changes; it rebuilds the heaps).
    """

    __slots__ = ("load", "_group", "_members", "_heaps", "_max_heap")

    def __init__(self, workers: int):
        if workers > _WORKER_MASK + 1:
            raise ValueError(f"at most {_WORKER_MASK + 1} workers, got {workers}")
        self.load = [0] * workers  # the load each worker was last set to (read only: change it by set)
        self._group: list[Optional[str]] = [None] * workers  # the group a worker is a member of
        self._members: dict[str, list[int]] = {}
        self._heaps: dict[str, list[int]] = {}  # entries load << 32 | worker
        self._max_heap: dict[str, int] = {}  # a heap longer than this is mostly stale: rebuilt

    def set_groups(self, groups: dict[str, Sequence[int]]) -> None:
        """The groups' members from now on (a worker in at most one group)."""
        self._group = [None] * len(self.load)
        self._members = {}
        self._heaps = {}
        self._max_heap = {}
        for name, workers in groups.items():
            for w in workers:
                if self._group[w] is not None:
                    raise ValueError(f"worker {w} is in groups {self._group[w]!r} and {name!r}")
                self._group[w] = name
            self._members[name] = list(workers)
            self._max_heap[name] = 4 * len(workers) + 64
            self._rebuild(name)

    def set(self, worker: int, load: int) -> None:
        """Worker ``worker``'s load is now ``load``."""
        if self.load[worker] == load:
            return
        self.load[worker] = load
        name = self._group[worker]
        if name is None:
            return
        heap = self._heaps[name]
        entry = load << _WORKER_BITS | worker
        if heap[0] & _WORKER_MASK == worker:
            # Its entry on top is stale now: replace it rather than push beside it (a placement goes
            # to the top worker, so this halves the heap operations of routing).
            heapreplace(heap, entry)
            return
        heappush(heap, entry)
        if len(heap) > self._max_heap[name]:  # mostly stale entries: start afresh
            self._rebuild(name)

    def least_loaded(self, name: str) -> int:
        """The member of group ``name`` with the lowest load, ties to the lowest index."""
        heap = self._heaps.get(name)
        if not heap:
            raise ValueError(f"group {name!r} has no workers")
        load = self.load
        while True:
            entry = heap[0]
            worker = entry & _WORKER_MASK
            if load[worker] == entry >> _WORKER_BITS:
                return worker
            heappop(heap)  # stale: its worker's load has changed since

    def _rebuild(self, name: str) -> None:
        load = self.load
        heap = [load[w] << _WORKER_BITS | w for w in self._members[name]]
        heapify(heap)
        self._heaps[name] = heap


def first_stage(plan: Plan, query_id: int, seed: int) -> Role:
    """The stage a new query goes to under ``plan``."""
    if plan.mode == "cascade":
        return "light"
    share = plan.light_share
    if share >= 1.0:
        return "light"
    if share <= 0.0:
        return "heavy"
    return "light" if stable_uniform(query_id, seed, STREAM_SPLIT) < share else "heavy"


def defers(confidence: float, threshold: float) -> bool:
    """Cascade rule: a light image whose confidence is below the threshold is re-generated by heavy."""
    return confidence < threshold
