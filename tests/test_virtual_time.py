"""The virtual-time event loop the engine tests run on (tests/virtual_time.py): timers fire at exact virtual
times, thread work takes none, and the guard turns a scenario that never ends into a failure."""

from __future__ import annotations

import asyncio
import threading

import pytest
from virtual_time import loop_time, run_virtual, wait_until


def test_sleeps_and_timeouts_take_exactly_their_virtual_time():
    async def scenario():
        seen = []

        async def sleeper(name, delay):
            await asyncio.sleep(delay)
            seen.append((name, loop_time()))

        await asyncio.gather(sleeper("b", 0.3), sleeper("a", 0.1), sleeper("c", 3600.0))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 2.5)
        return seen, loop_time()

    seen, end = run_virtual(scenario(), guard_s=7200.0)  # an hour of virtual time, in milliseconds
    assert seen == [("a", 0.1), ("b", 0.3), ("c", 3600.0)] and end == pytest.approx(3602.5)


def test_thread_work_takes_no_virtual_time_and_lands_before_the_next_timer():
    release = threading.Event()

    async def scenario():
        timer_fired = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, timer_fired.set)
        worker = asyncio.ensure_future(asyncio.to_thread(release.wait, 60))
        await asyncio.sleep(0)  # the thread is running and holds virtual time still ...
        threading.Timer(0.05, release.set).start()  # ... however long it takes in real time
        released = await worker
        return released, loop_time(), timer_fired.is_set()

    released, at, fired = run_virtual(scenario())
    assert released and at == 0.0 and not fired


def test_the_guard_ends_a_scenario_that_never_ends():
    async def forever():
        while True:
            await asyncio.sleep(1.0)

    with pytest.raises(asyncio.TimeoutError):
        run_virtual(forever(), guard_s=100.0)


def test_wait_until_polls_on_virtual_time_and_names_what_never_came():
    async def scenario():
        flag = []
        asyncio.get_running_loop().call_later(0.25, flag.append, 1)
        await wait_until(lambda: flag, "the flag", poll_s=0.1)
        first = loop_time()
        with pytest.raises(AssertionError, match="timed out waiting until nothing"):
            await wait_until(lambda: False, "nothing", guard_s=1.0)
        return first

    assert run_virtual(scenario()) == pytest.approx(0.3)
