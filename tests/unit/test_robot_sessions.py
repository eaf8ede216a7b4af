"""serving.robot_sessions on a simulated clock: what a robot has left of its last chunk, the frozen steps from
its measured delay, expiry, bounds, reset."""

from __future__ import annotations

import numpy as np

from serving.robot_sessions import RobotSessions

KEY = ("gr1", "default")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def chunk(h=16, value=0.0):
    return {"arm": (np.arange(h, dtype=np.float32)[:, None] + value).repeat(2, 1)[None]}


def test_the_remaining_steps_aligned_to_now_and_frozen_from_the_measured_delay():
    clock = Clock()
    s = RobotSessions(clock=clock)
    assert s.rtc_for("r1", KEY, 30.0) is None  # nothing delivered yet
    received = clock.t
    clock.t += 0.1  # the request took 100 ms at the server
    s.delivered("r1", KEY, chunk(), received)
    clock.t += 0.2  # 6 steps at 30 Hz ran since
    rtc = s.rtc_for("r1", KEY, 30.0)
    assert rtc["prev_actions"]["arm"].shape == (1, 10, 2) and rtc["prev_actions"]["arm"][0, 0, 0] == 6
    assert rtc["frozen_steps"] == 3 and rtc["overlap_steps"] == 10  # 100 ms at 30 Hz: 3 steps run meanwhile
    assert s.rtc_for("r1", ("gr1", "site-a"), 30.0) is None  # another model's chunk does not continue this one
    clock.t += 1.0  # the chunk is over
    assert s.rtc_for("r1", KEY, 30.0) is None


def test_sessions_expire_are_bounded_and_reset():
    clock = Clock()
    s = RobotSessions(max_robots=2, ttl_s=5.0, clock=clock)
    for rid in ("a", "b", "c"):
        s.delivered(rid, KEY, chunk(), clock.t)
    assert len(s) == 2 and s.rtc_for("a", KEY, 30.0) is None  # the least recently seen went first
    clock.t += 6.0
    assert s.rtc_for("b", KEY, 30.0) is None and len(s) == 0  # expired
    s.delivered("d", KEY, chunk(), clock.t)
    assert s.reset("d") and not s.reset("d") and len(s) == 0
