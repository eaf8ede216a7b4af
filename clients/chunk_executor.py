"""`ChunkExecutor`: a robot's control loop over action chunks, asking for the next chunk before this one ends.

Each control tick (at ``control_hz``) executes the next step of the current chunk. When ``request_at`` or fewer
steps are left (by default: half the chunk, or the predicted delay + 1 where that is more), the next chunk is asked for in the background, from a fresh observation, while the robot keeps
executing. The request says how many steps the robot has left (``options["buffer_steps"]``, with
``options["control_hz"]``): a deadline-aware server (fleetserve) serves the robots about to run dry first.

With ``rtc=True`` it also sends real-time chunking (``options["rtc"]``): the steps of the current chunk not
executed yet, aligned to the new chunk's first step, with the steps that will run anyway before the answer
arrives frozen (predicted from the round trips measured so far). The new chunk then continues the old one
instead of jumping. The executor switches to it at the step it is aligned to (the steps that ran while it was
computed are skipped), and counts idle ticks: ticks with no action left to run (the buffer ran dry).

``mode="sync"`` is the classic loop for comparison: run a chunk to its end, then ask and wait (idle meanwhile).

Upstream GR00T servers ignore the extra options, so against them this is plain asynchronous execution. The
executor needs a policy with ``get_action(observation, options) -> (action, info)`` (``PolicyClient``) and
works on the first sample of B=1 replies. Not thread-safe; one executor per robot.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["ChunkExecutor", "ExecutorStats"]


@dataclass
class ExecutorStats:
    ticks: int = 0
    idle_ticks: int = 0  # ticks with no action to run since the first chunk came: the buffer was empty
    chunks: int = 0  # chunks received
    requests: int = 0
    failures: int = 0  # requests that raised (the robot keeps its current chunk)
    failure_kinds: dict[str, int] = field(default_factory=dict)  # by the error's kind (reason), else its type
    round_trip_ms: list[float] = field(default_factory=list)
    staleness_ms: list[float] = field(default_factory=list)  # per executed step: age of the observation behind it
    executed: list[dict[str, np.ndarray]] = field(default_factory=list)  # with record=True: every executed step
    switches: list[int] = field(default_factory=list)  # with record=True: indices in `executed` of chunk switches


class ChunkExecutor:
    def __init__(
        self,
        policy: Any,
        observe: Callable[[], dict[str, Any]],
        act: Callable[[dict[str, np.ndarray]], None] | None = None,
        *,
        control_hz: float,
        request_at: int | None = None,
        mode: str = "async",
        rtc: bool = True,
        rtc_ramp_rate: float | None = 2.0,
        robot_id: str | None = None,
        options: dict[str, Any] | None = None,
        record: bool = False,
        clock: Callable[[], float] = time.monotonic,
        submit: Callable[..., Future] | None = None,
    ):
        if control_hz <= 0:
            raise ValueError(f"control_hz: expected a positive rate, got {control_hz}")
        if mode not in ("async", "sync"):
            raise ValueError(f"mode: expected 'async' or 'sync', got {mode!r}")
        self.policy, self.observe, self.act = policy, observe, act
        self.control_hz = float(control_hz)
        self.request_at = request_at
        self.mode = mode
        self.rtc = rtc and mode == "async"
        # A gentler blend than the server's default ramp (6.0, NVIDIA's): the row the robot switches on moves
        # ~30% towards the new chunk instead of ~60% (bench.loop, tiny-smooth, 8 robots: step across a switch
        # 0.89x the p95 step inside chunks at 2.0, 1.09x at 6.0). None: the server's default.
        self.rtc_ramp_rate = rtc_ramp_rate
        self.robot_id = robot_id
        self.base_options = dict(options or {})
        self.record = record
        self.clock = clock
        if submit is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-request")
            submit = self._pool.submit
        else:
            self._pool = None
        self._submit = submit
        self.stats = ExecutorStats()
        self._round_trips: deque[float] = deque(maxlen=20)  # what the delay prediction reads (kept over resets)
        self._chunk: dict[str, np.ndarray] | None = None  # {key: (H, D)}
        self._chunk_obs_time = 0.0
        self._index = 0  # next step of the current chunk
        self._tick = 0
        self._pending: Future | None = None
        self._pending_tick = 0
        self._pending_obs_time = 0.0
        self._pending_sent = 0.0
        self._last: dict[str, np.ndarray] | None = None
        self._stop = threading.Event()

    # -- the loop ----------------------------------------------------------------------------------------------
    @property
    def buffer_steps(self) -> int:
        """Steps of the current chunk not executed yet."""
        return 0 if self._chunk is None else self._horizon() - self._index

    def _horizon(self) -> int:
        return next(iter(self._chunk.values())).shape[0] if self._chunk else 0

    def _delay_steps(self, quantile: float = 50.0) -> int:
        """Steps that will run before a request sent now is answered (from the round trips so far: the median,
        or the given percentile)."""
        if not self._round_trips:
            return 0
        rt = float(np.percentile(self._round_trips, quantile))
        return int(math.ceil(rt / 1000.0 * self.control_hz))

    def _request(self) -> None:
        obs_time = self.clock()
        observation = self.observe()
        options = dict(self.base_options)
        left = self.buffer_steps
        options["buffer_steps"] = left
        options["control_hz"] = self.control_hz
        if self.robot_id is not None:
            options["robot_id"] = self.robot_id
        if self.rtc and self._chunk is not None and left > 0:
            rest = {k: np.ascontiguousarray(v[self._index :][None], dtype=np.float32) for k, v in self._chunk.items()}
            # frozen: the steps that run before the switch. A slower than median round trip switches later, onto
            # a row already blended towards the new chunk, so the p90 round trip sets them.
            options["rtc"] = {"prev_actions": rest, "frozen_steps": min(self._delay_steps(90.0), left)}
            if self.rtc_ramp_rate is not None:
                options["rtc"]["ramp_rate"] = float(self.rtc_ramp_rate)
        self.stats.requests += 1
        self._pending_tick, self._pending_obs_time = self._tick, obs_time
        sent = self._pending_sent = self.clock()

        def call():
            action, info = self.policy.get_action(observation, options)
            return action, info, (self.clock() - sent) * 1000.0

        self._pending = self._submit(call)

    def _collect(self) -> None:
        """Take a finished reply: the new chunk, aligned to the tick its request left at."""
        if self._pending is None or not self._pending.done():
            return
        future, self._pending = self._pending, None
        try:
            action, _info, rt_ms = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed request: keep executing what there is, ask again
            self.stats.failures += 1
            kind = getattr(exc, "kind", None)
            label = f"{kind} ({exc.reason})" if kind and getattr(exc, "reason", None) else kind or type(exc).__name__
            self.stats.failure_kinds[label] = self.stats.failure_kinds.get(label, 0) + 1
            return
        self.stats.round_trip_ms.append(rt_ms)
        self._round_trips.append(rt_ms)
        self.stats.chunks += 1
        chunk = {k: np.asarray(v)[0] for k, v in action.items()}
        ran = self._tick - self._pending_tick if self.mode == "async" else 0
        self._chunk, self._index, self._chunk_obs_time = chunk, min(ran, next(iter(chunk.values())).shape[0]), self._pending_obs_time
        if self.record:
            self.stats.switches.append(len(self.stats.executed))

    def step(self) -> dict[str, np.ndarray] | None:
        """One control tick: collect a finished reply, run one step (None: idle), ask for a chunk when due."""
        self._collect()
        if self._pending is None:
            due = self.buffer_steps == 0 if self.mode == "sync" else self.buffer_steps <= self._request_threshold()
            if due:
                self._request()
                if self.mode == "sync":  # wait for it, the robot standing still meanwhile
                    try:
                        self._pending.result()
                    except Exception:  # noqa: BLE001 - _collect counts it; the next tick asks again
                        pass
                    self._collect()
                    if self.stats.chunks > 1:  # the ticks that passed while it stood
                        waited = int((self.clock() - self._pending_sent) * self.control_hz)
                        self.stats.ticks += waited
                        self.stats.idle_ticks += waited
                        self._tick += waited
        self.stats.ticks += 1
        self._tick += 1
        if self.buffer_steps == 0:
            if self.stats.chunks:  # not before the first chunk: starting up is not running dry
                self.stats.idle_ticks += 1
            return None
        step = {k: v[self._index] for k, v in self._chunk.items()}
        self._index += 1
        self.stats.staleness_ms.append((self.clock() - self._chunk_obs_time) * 1000.0)
        if self.record:
            self.stats.executed.append(step)
        if self.act is not None:
            self.act(step)
        self._last = step
        return step

    def _request_threshold(self) -> int:
        if self.request_at is not None:
            return self.request_at
        # Early enough to be answered before running dry, and at half the chunk at the latest (LeRobot's async
        # client asks there by default): RTC blends the old chunk into the new over the steps left beyond the
        # frozen ones, and asked at delay + 1 there would be one step to blend over - a jump all the same.
        return max(1, self._delay_steps() + 1, self._horizon() // 2)

    def run(self, duration_s: float, sleep: Callable[[float], None] = time.sleep) -> ExecutorStats:
        """Tick at ``control_hz`` for ``duration_s`` seconds (or until :meth:`stop`); returns the stats. A tick
        that overran its period is not made up: the next one starts at its own time."""
        period = 1.0 / self.control_hz
        start = self.clock()
        next_tick = start
        while not self._stop.is_set() and self.clock() - start < duration_s:
            self.step()
            next_tick += period
            delay = next_tick - self.clock()
            if delay > 0:
                sleep(delay)
            else:
                next_tick = self.clock()
        if self._pending is not None:
            self._pending.cancel()
        return self.stats

    def reset_stats(self) -> ExecutorStats:
        """Start counting afresh (after a warm-up); the delay prediction keeps what it has measured."""
        old, self.stats = self.stats, ExecutorStats(chunks=1 if self.stats.chunks else 0)
        return old

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
