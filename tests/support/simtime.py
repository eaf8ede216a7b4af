"""An asyncio event loop on simulated time, for tests of code that waits (the scheduler, the pass queue).

`loop.time()` is a number the loop advances itself: when nothing is ready to run, it jumps to the next timer
instead of sleeping. So `asyncio.sleep(0.2)`, `call_later`, timeouts and the code's own clock (pass `loop.time`
as the clock) all agree, a test of seconds of traffic runs in milliseconds, and the outcome is the same on a
busy machine as on an idle one: no real sleeps, no thresholds loosened for noise. CPU work takes no
simulated time. Anything that blocks on real I/O or threads is out of its reach (it raises rather than hang).
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
START = 1_000_000.0  # far from 0, so times look like the epoch seconds the scheduler sees in production


class _JumpingSelector(selectors.BaseSelector):
    """Polls the real file descriptors (the loop's self-pipe) without waiting; a wait becomes a jump in time."""

    def __init__(self, loop: "SimulatedLoop"):
        self._loop = loop
        self._real = selectors.DefaultSelector()

    def register(self, fileobj, events, data=None):
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj):
        return self._real.unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        return self._real.modify(fileobj, events, data)

    def select(self, timeout=None):
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("simulated time: nothing is scheduled and nothing is ready (the test would hang)")
        self._loop.advance(timeout)
        return []

    def get_map(self):
        return self._real.get_map()

    def close(self):
        self._real.close()


class SimulatedLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = START):
        self._now = start
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)


def run(main: Callable[[], Awaitable[T]], start: float = START) -> T:
    """`main()` on a fresh simulated loop (`asyncio.get_running_loop().time` is its clock)."""
    loop = SimulatedLoop(start)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def clock() -> Callable[[], float]:
    """The running simulated loop's clock, to inject into the code under test."""
    return asyncio.get_running_loop().time


__all__: list[Any] = ["SimulatedLoop", "clock", "run"]
