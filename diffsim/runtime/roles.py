"""Which worker takes which role when a new plan arrives, with the fewest switches.

A worker's role is ``"light"``, ``"heavy"`` or ``None`` (idle). :func:`assign_roles`:

1. keeps as many current workers of each role as the plan wants, the lowest indices first;
2. fills the remaining places of each role (light first) from the workers it released from the other
   role, lowest index first (moving a surplus worker straight to where it is needed is one switch;
   idling it and waking an idle worker would be two), then from idle workers, lowest index first;
3. leaves everyone else idle.

This changes the role of the fewest possible workers, and is deterministic.

What a switch means for the work (applied by the drivers through :class:`diffsim.runtime.dispatcher.Dispatcher`):
the switching worker finishes its running batch; its queued queries are re-routed to workers of their
stage (or the stage's backlog when it has none) -- never lost; when it takes a model it does not hold
(:func:`needs_swap`), it serves nothing for the configured swap time (default 0: in the DiffServe
testbed both models stay resident on every GPU).
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..plan import Role


def assign_roles(current: Sequence[Optional[Role]], light: int, heavy: int) -> list[Optional[Role]]:
    """New roles for workers 0..n-1, given their current roles and the wanted counts."""
    n = len(current)
    if light < 0 or heavy < 0:
        raise ValueError(f"worker counts must be >= 0, got light={light} heavy={heavy}")
    if light + heavy > n:
        raise ValueError(f"the plan wants {light} + {heavy} workers but there are {n}")
    want = {"light": light, "heavy": heavy}
    new: list[Optional[Role]] = [None] * n
    released: dict[str, list[int]] = {"light": [], "heavy": []}
    idle: list[int] = []
    kept = {"light": 0, "heavy": 0}
    for w, role in enumerate(current):
        if role is None:
            idle.append(w)
        elif kept[role] < want[role]:
            new[w] = role
            kept[role] += 1
        else:
            released[role].append(w)
    for role, other in (("light", "heavy"), ("heavy", "light")):
        pool = released[other] + idle
        missing = want[role] - kept[role]
        for w in pool[:missing]:
            new[w] = role
        taken = set(pool[:missing])
        released[other] = [w for w in released[other] if w not in taken]
        idle = [w for w in idle if w not in taken]
    return new


def switched(old: Sequence[Optional[Role]], new: Sequence[Optional[Role]]) -> list[int]:
    """Indices of the workers whose role changes, ascending."""
    return [w for w, (a, b) in enumerate(zip(old, new)) if a != b]


def needs_swap(loaded: Optional[Role], new_role: Optional[Role]) -> bool:
    """Whether taking ``new_role`` means loading a model: a role different from the model it holds."""
    return new_role is not None and loaded != new_role
