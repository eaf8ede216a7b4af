"""A bounded closed-loop fleet of robot threads (one `PolicyClient` each), for tests that need load they can stop.

`bench.fleet.run_fleet` runs for a fixed duration; the autoscaling and multi-node tests need load that
runs until a condition is met (a scale-up, a node removed and recovered) and then stops, while recording
which replica answered each request and every error by kind. Each robot stops at `stop()`, after
`max_requests`, or at `max_seconds`, whichever comes first: nothing here can run unbounded.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from clients import PolicyClient, PolicyServerError, PolicyTimeoutError
from clients.observations import random_observation


def error_kind(exc: BaseException) -> str:
    """A short, stable name for an error a robot saw (the server's message up to its first colon)."""
    if isinstance(exc, PolicyTimeoutError):
        return "client timeout"
    if isinstance(exc, PolicyServerError):
        parts = exc.message.split(":")
        # "policy 'gr1' failed: <exception type>: ..." keeps the exception type; others the text before ":".
        head = ":".join(parts[:2]) if exc.message.startswith("policy ") and len(parts) > 1 else parts[0]
        return "server: " + head[:80]
    return f"{type(exc).__name__}: {str(exc)[:60]}"


class RobotLoad:
    """`robots` threads sending get_action in a closed loop to the targets (robot i to target i mod n)."""

    def __init__(self, targets: list[tuple[str, int, str, dict[str, Any]]], robots: int, *, timeout_ms: int = 20_000,
                 max_requests: int = 20_000, max_seconds: float = 240.0, pause_s: float = 0.0):
        self.targets = targets  # (host, port, embodiment tag, its description from an info reply)
        self.robots = robots
        self.timeout_ms = timeout_ms
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause_s = pause_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.answered: Counter[str] = Counter()  # embodiment -> actions received
        self.replicas: dict[str, Counter[str]] = {}  # embodiment -> replica id -> actions
        self.errors: Counter[str] = Counter()  # error kind -> count
        self.errors_by_embodiment: dict[str, Counter[str]] = {}  # embodiment -> error kind -> count
        self.error_log: list[tuple[float, str, str]] = []  # (unix time, embodiment, message), first 50
        self.last_ok: dict[str, float] = {}  # embodiment -> unix time of its latest action
        self.started_at = 0.0

    def start(self) -> "RobotLoad":
        self.started_at = time.time()
        for i in range(self.robots):
            t = threading.Thread(target=self._robot, args=(i,), name=f"robot-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _robot(self, i: int) -> None:
        host, port, tag, embodiment = self.targets[i % len(self.targets)]
        rng = np.random.default_rng(i)
        observations = [random_observation(embodiment, 1, rng=rng) for _ in range(2)]
        give_up = time.monotonic() + self.max_seconds
        with PolicyClient(host, port, timeout_ms=self.timeout_ms) as client:
            for n in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > give_up:
                    return
                try:
                    _action, info = client.get_action(observations[n % 2])
                except Exception as exc:  # recorded by kind; the robot carries on, as a real one would
                    kind = error_kind(exc)
                    with self._lock:
                        self.errors[kind] += 1
                        self.errors_by_embodiment.setdefault(tag, Counter())[kind] += 1
                        if len(self.error_log) < 50:
                            self.error_log.append((time.time(), tag, f"{type(exc).__name__}: {str(exc)[:200]}"))
                    self._stop.wait(0.05)
                    continue
                server = info.get("server", {})
                served = server.get("embodiment_tag", tag)
                with self._lock:
                    self.answered[served] += 1
                    self.replicas.setdefault(served, Counter())[server.get("replica", "?")] += 1
                    self.last_ok[served] = time.time()
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "answered": dict(self.answered),
                "replicas": {k: dict(v) for k, v in self.replicas.items()},
                "errors": dict(self.errors),
                "errors_by_embodiment": {k: dict(v) for k, v in self.errors_by_embodiment.items()},
                "last_ok": dict(self.last_ok),
            }

    def stop(self, join_timeout: float | None = None) -> None:
        """Stop every robot; each finishes (or times out) its request in flight first."""
        self._stop.set()
        join_timeout = self.timeout_ms / 1000 + 5 if join_timeout is None else join_timeout
        deadline = time.monotonic() + join_timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise AssertionError(f"robots still running {join_timeout:.0f}s after stop: {alive}")

    def __enter__(self) -> "RobotLoad":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            self.stop()
        except AssertionError:
            if exc[0] is None:
                raise
