"""An asyncio event loop on virtual time, for tests of the wall-clock engine that must not depend on the
machine's speed.

``loop.time()`` starts at 0 and moves only when the loop has nothing else to do: then it jumps to the next
timer (``asyncio.sleep``, ``wait_for`` timeouts, ``call_later``). So a fake worker's ``asyncio.sleep(0.4)``
takes exactly 0.4 s of the engine's clock, ticks come exactly every ``tick_s``, and a scenario plays out
the same on a machine 10x faster or 10x slower (and in milliseconds of real time).

Work handed to a thread with ``loop.run_in_executor`` (``asyncio.to_thread``: the engine's controller)
takes no virtual time: while such a call runs, the loop waits for it before it runs anything else, so its
result lands at the same point every run. Threads the loop does not know about (a ``ThreadWorker``'s own
pool) are not waited for: use this loop with fake workers only.

Give every engine run on it ``clock=loop_time``: the engine's default clock is the real one.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")


class _VirtualSelector:
    """The real selector (the loop's self-pipe, any real socket), but an empty wait moves virtual time."""

    def __init__(self, loop: "VirtualTimeLoop"):
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def select(self, timeout=None):
        loop = self._loop
        if loop._threads_running:  # a thread is working: wait for its result; virtual time stands still
            return self._real.select(None)
        if timeout == 0:  # callbacks are ready: only look for I/O
            return self._real.select(0)
        if loop._threads_undelivered:  # a thread has finished; its result is on its way through the self-pipe
            return self._real.select(None)
        events = self._real.select(0)
        if events or timeout is None:  # no timer left: only real I/O can wake the loop
            return events or self._real.select(None)
        loop._now += timeout  # nothing to do until the next timer: jump to it
        return []

    def __getattr__(self, name):  # register, unregister, modify, get_key, get_map, close
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is virtual (see the module's docstring)."""

    def __init__(self):
        self._now = 0.0
        self._lock = threading.Lock()
        self._threads_running = 0  # run_in_executor calls whose function has not returned yet
        self._threads_undelivered = 0  # ... whose result the loop has not taken yet
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def run_in_executor(self, executor, func, *args):
        with self._lock:
            self._threads_running += 1
        self._threads_undelivered += 1

        def call():
            try:
                return func(*args)
            finally:
                with self._lock:
                    self._threads_running -= 1

        future = super().run_in_executor(executor, call)

        def delivered(_):
            self._threads_undelivered -= 1

        future.add_done_callback(delivered)
        return future


def loop_time() -> float:
    """The running loop's clock: an engine's ``clock`` on a :class:`VirtualTimeLoop`."""
    return asyncio.get_running_loop().time()


def run_virtual(coro: Awaitable[T], guard_s: float = 600.0) -> T:
    """Run ``coro`` on a fresh :class:`VirtualTimeLoop`. ``guard_s`` is virtual seconds: a failure guard
    that turns a scenario that never ends into a TimeoutError (the engine's periodic loops keep virtual
    time moving, so it comes after milliseconds of real time); it never shortens a passing run."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(asyncio.wait_for(coro, guard_s))


async def wait_until(predicate, what: str, guard_s: float = 20.0, poll_s: float = 0.005) -> None:
    """Poll ``predicate`` every ``poll_s`` of the loop's time until it holds. On a :class:`VirtualTimeLoop`
    the moment it first holds is the same every run; ``guard_s`` only turns a condition that never comes
    into a failure naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(poll_s)
