"""A replica's pass queue (serving.passes) without Ray: a fake forward in the worker thread, held on an Event
where a test needs calls to arrive during a pass (waits are on conditions with a deadline, never sleeps)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.messages import ForwardPass, InferenceOutcome, InferenceRequest
from serving.passes import PassQueue, chunks

WAIT_S = 10.0  # a bound on every wait below; they end as soon as their condition holds


class FakeForward:
    """Records each pass (policy, request ids, thread); `hold` keeps a pass running until released."""

    def __init__(self):
        self.passes: list[tuple[str, list[int], str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def __call__(self, policy, requests):
        self.started.set()
        assert self.hold.wait(WAIT_S), "a test never released its pass"
        self.passes.append((policy, [r.observation["id"] for r in requests], threading.current_thread().name))
        outcomes = [InferenceOutcome({"id": r.observation["id"], "policy": policy}, {}) for r in requests]
        return outcomes, ForwardPass(time.time(), 1.0, sum(r.samples for r in requests))


def req(i: int, samples: int = 1) -> InferenceRequest:
    return InferenceRequest({"id": i}, None, samples)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def test_a_call_to_an_idle_replica_starts_its_pass_at_once_in_the_worker_thread():
    async def main():
        fwd = FakeForward()
        q = PassQueue(fwd)
        result = await q.run("default", [req(1), req(2)])
        assert [o.action["id"] for o in result.outcomes] == [1, 2]
        assert result.pass_of == [0, 0] and result.passes[0].samples == 2 and result.taken > 0
        assert fwd.passes[0][2].startswith("forward")  # not the event loop's thread
        q.close()

    asyncio.run(main())


def test_calls_arriving_during_a_pass_ride_the_next_one_per_model_and_within_the_batch_size():
    async def main():
        fwd = FakeForward()
        q = PassQueue(fwd, max_batch_size=3)
        fwd.hold.clear()
        first = asyncio.ensure_future(q.run("default", [req(0)]))
        await until(fwd.started.is_set, "the first pass to start")
        later = [asyncio.ensure_future(q.run("default", [req(1), req(2)])),
                 asyncio.ensure_future(q.run("ft", [req(3)])),
                 asyncio.ensure_future(q.run("default", [req(4, samples=2)]))]
        await until(lambda: q.waiting == 3, "three calls waiting")
        fwd.hold.set()
        results = await asyncio.gather(first, *later)
        # one pass for the lone call, then the merged ones: per model, at most 3 samples, requests never split
        assert [(p, ids) for p, ids, _ in fwd.passes] == [("default", [0]), ("default", [1, 2]), ("default", [4]),
                                                         ("ft", [3])]
        assert [o.action["policy"] for o in results[2].outcomes] == ["ft"]
        assert results[1].pass_of == [0, 0] and results[3].pass_of == [0]
        q.close()

    asyncio.run(main())


def test_a_caller_that_gives_up_does_not_cost_the_others_their_pass():
    async def main():
        fwd = FakeForward()
        q = PassQueue(fwd)
        fwd.hold.clear()
        gone = asyncio.ensure_future(q.run("default", [req(0)]))
        await until(fwd.started.is_set, "the pass to start")
        stays = asyncio.ensure_future(q.run("default", [req(1)]))
        await until(lambda: q.waiting == 1, "the second call waiting")
        gone.cancel()  # its robot's deadline passed: Serve cancels the call
        fwd.hold.set()
        assert [o.action["id"] for o in (await stays).outcomes] == [1]
        with pytest.raises(asyncio.CancelledError):
            await gone
        q.close()

    asyncio.run(main())


def test_chunks_never_split_a_request():
    items = [(0, req(0, 2)), (0, req(1, 2)), (1, req(2, 5)), (1, req(3, 1))]
    assert [[r.observation["id"] for _, r in c] for c in chunks(items, 4)] == [[0, 1], [2], [3]]
