"""Robot sessions: the last chunk the server delivered to each robot, so a robot need not resend it for RTC.

A robot that names itself (``options["robot_id"]``) and gives its control rate (``options["control_hz"]``, else
its embodiment's ``control_hz``) gets real-time chunking without sending its previous chunk: the server knows
what it delivered and when, so it knows which steps of it the robot has executed by now, which are left, and —
from the time its recent requests took — how many more will run before the new chunk arrives (the frozen
steps). The previous chunk's remaining steps, aligned to the new chunk's first step, become ``options["rtc"]``.

Bounded: at most ``max_robots`` sessions (the least recently seen go first), each forgotten ``ttl_s`` after
its robot's last request; ``reset`` forgets one. A robot on another ingress, or after a restart, simply starts
fresh (its next request has no previous chunk: no RTC).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

DEFAULT_MAX_ROBOTS = 4096
DEFAULT_TTL_S = 60.0
# How much of a robot's recent request times the frozen-step prediction weighs (an EMA: one slow request moves
# it, one fast one does not undo it at once).
DELAY_EMA = 0.3


@dataclass
class _Session:
    key: tuple[str, str]  # (embodiment, model): a chunk continues only a chunk of the same policy
    chunk: dict[str, np.ndarray] | None = None  # {action key: (H, D)}
    delivered_at: float = 0.0
    delay_s: float | None = None  # EMA of receive -> reply at the server
    seen_at: float = field(default=0.0)


class RobotSessions:
    def __init__(self, max_robots: int = DEFAULT_MAX_ROBOTS, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.max_robots, self.ttl_s, self.clock = max_robots, ttl_s, clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self, now: float) -> None:
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.seen_at <= self.ttl_s and len(self._sessions) <= self.max_robots:
                break
            self._sessions.popitem(last=False)

    def rtc_for(self, robot_id: str, key: tuple[str, str], control_hz: float) -> dict | None:
        """``options["rtc"]`` continuing the robot's last chunk, as of now; None when there is nothing to
        continue (no chunk, another policy, the chunk fully executed)."""
        now = self.clock()
        self._expire(now)
        s = self._sessions.get(robot_id)
        if s is None or s.chunk is None or s.key != key:
            return None
        s.seen_at = now
        self._sessions.move_to_end(robot_id)
        executed = int(math.floor((now - s.delivered_at) * control_hz))
        horizon = next(iter(s.chunk.values())).shape[0]
        left = horizon - executed
        if executed < 0 or left <= 0:
            return None
        frozen = min(left, int(math.ceil((s.delay_s or 0.0) * control_hz)))
        prev = {k: np.ascontiguousarray(v[executed:][None]) for k, v in s.chunk.items()}
        return {"prev_actions": prev, "frozen_steps": frozen, "overlap_steps": left}

    def delivered(self, robot_id: str, key: tuple[str, str], actions: dict[str, np.ndarray], received_at: float) -> None:
        """A B=1 chunk ``actions`` ({key: (1, H, D)}) went to the robot now, for a request received at
        ``received_at`` (on this session's clock)."""
        now = self.clock()
        s = self._sessions.get(robot_id)
        if s is None or s.key != key:
            s = _Session(key)
            self._sessions[robot_id] = s
        took = max(0.0, now - received_at)
        s.delay_s = took if s.delay_s is None else (1 - DELAY_EMA) * s.delay_s + DELAY_EMA * took
        s.chunk = {k: np.array(v[0], dtype=np.float32) for k, v in actions.items()}
        s.delivered_at = now
        s.seen_at = now
        self._sessions.move_to_end(robot_id)
        self._expire(now)

    def reset(self, robot_id: str) -> bool:
        return self._sessions.pop(robot_id, None) is not None


__all__ = ["RobotSessions"]
