"""clients.ChunkExecutor on a simulated clock with a stand-in policy (no server): request timing, alignment of
the new chunk, RTC and buffer options, idle ticks, sync vs async."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from clients.chunk_executor import ChunkExecutor

HZ, H = 30.0, 16


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Policy:
    """Answers after `latency_ticks` ticks of the clock: chunk row j = (call number, j)."""

    def __init__(self, clock: Clock):
        self.clock, self.calls, self.options = clock, 0, []

    def get_action(self, observation, options):
        self.calls += 1
        self.options.append(options)
        rows = np.stack([np.full(2, self.calls * 100 + j, np.float32) for j in range(H)])
        return {"arm": rows[None]}, {}


class Deferred:
    """submit() that completes a call `latency_ticks` executor steps later (a simulated round trip)."""

    def __init__(self, clock: Clock, latency_ticks: int):
        self.clock, self.latency, self.queue = clock, latency_ticks, []

    def __call__(self, fn):
        fut = Future()
        self.queue.append([self.latency, fn, fut])
        return fut

    def advance(self):
        for item in self.queue:
            item[0] -= 1
        for item in [i for i in self.queue if i[0] <= 0]:
            self.clock.t += 0.0  # the reply is computed "now"
            item[2].set_result(item[1]())
            self.queue.remove(item)


def run(executor: ChunkExecutor, deferred: Deferred, clock: Clock, ticks: int):
    out = []
    for _ in range(ticks):
        out.append(executor.step())
        deferred.advance()
        clock.t += 1 / HZ
    return out


def test_async_rtc_asks_early_aligns_the_new_chunk_and_never_runs_dry():
    clock = Clock()
    deferred = Deferred(clock, latency_ticks=3)
    policy = Policy(clock)
    ex = ChunkExecutor(policy, lambda: {"obs": 1}, control_hz=HZ, request_at=5, clock=clock, submit=deferred,
                       robot_id="r1", record=True)
    steps = run(ex, deferred, clock, 60)
    first = next(i for i, s in enumerate(steps) if s is not None)
    assert ex.stats.idle_ticks == 0 and all(s is not None for s in steps[first:])
    assert policy.calls >= 3
    opts = policy.options[1]
    assert opts["buffer_steps"] == 5 and opts["control_hz"] == HZ and opts["robot_id"] == "r1"
    rtc = opts["rtc"]
    assert rtc["prev_actions"]["arm"].shape == (1, 5, 2)  # the 5 steps left, aligned to the new chunk
    np.testing.assert_array_equal(rtc["prev_actions"]["arm"][0, :, 0], [111, 112, 113, 114, 115])
    assert 1 <= rtc["frozen_steps"] <= 5  # the steps the measured round trip will take
    assert rtc["ramp_rate"] == 2.0  # the executor's gentler blend
    # the switch skips the rows that ran while the chunk was computed: no step is repeated or lost
    values = [int(s["arm"][0]) for s in steps[first:]]
    switch = ex.stats.switches[1] - 0
    assert values[switch] % 100 == 3  # new chunk entered at row 3 (3 ticks of latency)


def test_by_default_it_asks_at_half_the_chunk_or_earlier_where_the_delay_needs_it():
    """RTC blends over the steps left beyond the frozen ones: asked at delay + 1 it would have one to blend over."""
    for latency, asked_at in ((2, H // 2), (5, H // 2)):
        clock = Clock()
        deferred = Deferred(clock, latency_ticks=latency)
        policy = Policy(clock)
        ex = ChunkExecutor(policy, lambda: {}, control_hz=HZ, clock=clock, submit=deferred)
        run(ex, deferred, clock, 80)
        assert policy.calls >= 4
        assert [o["buffer_steps"] for o in policy.options[1:4]] == [asked_at] * 3, policy.options
    # a round trip longer than half the chunk: asked as soon as a chunk arrives (with what is left of it)
    clock = Clock()
    deferred = Deferred(clock, latency_ticks=12)
    policy = Policy(clock)
    ex = ChunkExecutor(policy, lambda: {}, control_hz=HZ, clock=clock, submit=deferred)
    run(ex, deferred, clock, 80)
    assert [o["buffer_steps"] for o in policy.options[1:4]] == [H - 12] * 3, policy.options


def test_sync_mode_waits_and_counts_the_idle_ticks():
    clock = Clock()

    class Slow(Policy):
        def get_action(self, observation, options):
            clock.t += 0.1  # 3 control periods of inference, the robot standing still
            return super().get_action(observation, options)

    policy = Slow(clock)
    ex = ChunkExecutor(policy, lambda: {}, control_hz=HZ, mode="sync", clock=clock,
                       submit=lambda fn: _done(fn()))
    for _ in range(40):
        ex.step()
        clock.t += 1 / HZ
    assert policy.calls >= 2 and ex.stats.idle_ticks >= 2 * 2
    assert "rtc" not in policy.options[1] and policy.options[1]["buffer_steps"] == 0


def _done(value) -> Future:
    fut = Future()
    fut.set_result(value)
    return fut


def test_a_failed_request_keeps_the_robot_on_its_chunk_and_is_counted():
    clock = Clock()

    class Flaky(Policy):
        def get_action(self, observation, options):
            if self.calls == 1:
                self.calls += 1
                raise TimeoutError("no reply")
            return super().get_action(observation, options)

    ex = ChunkExecutor(Flaky(clock), lambda: {}, control_hz=HZ, request_at=4, clock=clock, submit=lambda fn: _future(fn))
    for _ in range(40):
        ex.step()
        clock.t += 1 / HZ
    assert ex.stats.failures == 1 and ex.stats.chunks >= 2
    assert ex.stats.failure_kinds == {"TimeoutError": 1}


def _future(fn) -> Future:
    fut = Future()
    try:
        fut.set_result(fn())
    except Exception as exc:  # noqa: BLE001
        fut.set_exception(exc)
    return fut


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="control_hz"):
        ChunkExecutor(None, dict, control_hz=0)
    with pytest.raises(ValueError, match="mode"):
        ChunkExecutor(None, dict, control_hz=30, mode="later")


def test_loop_smoothness_metric_sees_a_jump_at_a_switch_and_none_without():
    from bench.loop import smoothness

    steps = [{"a": np.array([np.sin(0.2 * t)])} for t in range(40)]
    assert max(smoothness(steps, [20])["jump"]) <= 1.0  # switching as smooth as stepping
    jumped = steps[:20] + [{"a": np.array([5.0 + np.sin(0.2 * t)])} for t in range(20, 40)]
    assert smoothness(jumped, [20])["jump"][0] > 10  # a 5-unit jump against steps of at most 0.2
    assert smoothness(jumped, [20])["jerk"][0] > 10
