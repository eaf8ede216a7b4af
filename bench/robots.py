"""The simulated robot every scenario drives servers with, and what it needs: addresses, the server's `info`,
encoded observations, and the one way a reply is classified.

A `Robot` is a GR00T REQ client on an asyncio event loop (hundreds share one loop, no thread each). It asks
its scenario for the next `Request` (which server, which encoded message - a fine-tune, a deadline class, a
hostile message - and how long to wait), sends it, and hands each `Outcome` back. Closed loop (the next
request as soon as the reply is in) or at a fixed rate (`rate_hz`: a late robot skips ticks, never bursts).
A request without a reply within its timeout is a `timeout`; the REQ socket is then rebuilt, since a REQ
socket that lost its reply is stuck. Replies are classified once, here (`classify`): an action, an error
reply by its `kind` and `reason` (typed by the server; the message is for people), or garbled.

`run_robots` runs a crew until a stop time and drains it; `BackgroundFleet` runs one in a thread for callers
(tests) that start load, watch it, and stop it when a condition is met.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import zmq
import zmq.asyncio

from clients.codec import CodecError, packb, unpackb
from clients.observations import random_observation

ACTION, ERROR, TIMEOUT, SOCKET_ERROR, GARBLED = "action", "error", "timeout", "socket error", "garbled"


# ---------------------------------------------------------------------------------------------------------
# addresses, info and encoded observations


@dataclass(frozen=True)
class Target:
    """A server address; `embodiment_tag` (optional) is sent as the request's top-level routing field."""

    host: str
    port: int
    embodiment_tag: str | None = None

    @property
    def address(self) -> str:
        host = self.host.strip("[]")
        return f"tcp://[{host}]:{self.port}" if ":" in host else f"tcp://{host}:{self.port}"

    @property
    def label(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host.strip("[]") else self.host
        return f"{host}:{self.port}" + (f"/{self.embodiment_tag}" if self.embodiment_tag else "")


def parse_target(text: str, default_host: str = "127.0.0.1") -> Target:
    """`host:port`, `port`, `[v6]:port`, each optionally followed by `/embodiment_tag`."""
    spec, _, tag = text.strip().partition("/")
    host, port = default_host, spec
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0 or not spec[end + 1:].startswith(":"):
            raise ValueError(f"target {text!r}: expected [ipv6]:port")
        host, port = spec[1:end], spec[end + 2:]
    elif ":" in spec:
        host, _, port = spec.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"target {text!r}: expected host:port (port a number), got port {port!r}") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"target {text!r}: port {number} out of range 1-65535")
    return Target(host or default_host, number, tag or None)


def as_target(t: Target | str | int) -> Target:
    return t if isinstance(t, Target) else parse_target(str(t))


def fetch_info(target: Target | str, timeout_ms: int = 10_000, api_token: str | None = None,
               context: zmq.Context | None = None) -> dict[str, Any]:
    """The `info` reply of a server (blocking, bounded by `timeout_ms`); raises TimeoutError / RuntimeError."""
    target = as_target(target)
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(target.address)
        request: dict[str, Any] = {"endpoint": "info"}
        if api_token is not None:
            request["api_token"] = api_token
        if target.embodiment_tag:
            request["embodiment_tag"] = target.embodiment_tag
        sock.send(packb(request))
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"{target.address}: no reply to 'info' within {timeout_ms} ms (is the server up?)")
        reply = unpackb(sock.recv(copy=False).buffer)
    finally:
        sock.close(linger=0)
    if isinstance(reply, dict) and "error" in reply:
        raise RuntimeError(f"{target.address}: 'info' answered an error: {reply['error']}")
    if not isinstance(reply, dict) or "embodiments" not in reply:
        raise RuntimeError(f"{target.address}: 'info' reply has no 'embodiments' (not a fleetserve-style server?)")
    return reply


def embodiment_of(info: dict[str, Any], target: Target) -> dict[str, Any]:
    """The description of the embodiment `target` is served: its tag, or the port's default."""
    tag = target.embodiment_tag or info.get("default_embodiment")
    embodiments = info["embodiments"]
    if tag not in embodiments:
        lowered = {k.lower(): k for k in embodiments}
        if isinstance(tag, str) and tag.lower() in lowered:
            tag = lowered[tag.lower()]
        elif len(embodiments) == 1:
            tag = next(iter(embodiments))
        else:
            raise ValueError(f"{target.label}: embodiment {tag!r} not in the server's {sorted(embodiments)}")
    return embodiments[tag]


def build_payloads(target: Target, embodiment: dict[str, Any], batch: int, image_size: tuple[int, int] | None,
                   count: int, seed: int, api_token: str | None = None, *, options: dict[str, Any] | None = None,
                   model_id: str | None = None) -> list[bytes]:
    """`count` distinct, already encoded get_action requests for `target` (robots share them round-robin);
    `options` (a deadline, ...) and `model_id` (a fine-tune) go into every one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        request: dict[str, Any] = {
            "endpoint": "get_action",
            "data": {"observation": random_observation(embodiment, batch, image_size=image_size, rng=rng),
                     "options": options},
        }
        if api_token is not None:
            request["api_token"] = api_token
        if target.embodiment_tag:
            request["embodiment_tag"] = target.embodiment_tag
        if model_id is not None:
            request["model_id"] = model_id
        out.append(packb(request))
    return out


# ---------------------------------------------------------------------------------------------------------
# requests and outcomes


@dataclass(frozen=True)
class Request:
    """One message a robot sends: where, what (already encoded), how long it waits for the reply, and a label
    the scenario sorts the outcome by (a deadline class, a hostile case, a fine-tune's rank, ...)."""

    address: str
    payload: bytes
    timeout_s: float
    label: Any = None


@dataclass
class Outcome:
    """What became of one request. Times are `time.perf_counter()` seconds."""

    request: Request
    robot: int
    sent_at: float
    done_at: float
    status: str  # ACTION, ERROR, TIMEOUT, SOCKET_ERROR or GARBLED
    kind: str | None = None  # an error reply's `kind` (ErrorKind); None from a server that sends none
    reason: str | None = None  # an error reply's `reason` (Refusal), where it gives one
    message: str | None = None  # the error text, or why the reply counts as garbled
    reply: Any = None  # the decoded reply

    @property
    def latency_ms(self) -> float:
        return (self.done_at - self.sent_at) * 1000.0

    @property
    def server(self) -> dict[str, Any]:
        """`info["server"]` of an action reply (batch_size, infer_ms, replica, trace, ...); {} otherwise."""
        if self.status != ACTION or not isinstance(self.reply[1], dict):
            return {}
        server = self.reply[1].get("server")
        return server if isinstance(server, dict) else {}

    @property
    def label(self) -> str:
        """A short, stable name to count outcomes by: `action`, `timeout`, `overloaded (refused_early)`, ..."""
        if self.status == ERROR:
            if self.kind is not None:
                return self.kind + (f" ({self.reason})" if self.reason else "")
            # a server that types no error (upstream's): its message up to the first ':' stands for the kind
            text = self.message or ""
            return "error reply: " + (text.split(":", 1)[0] if ":" in text[:61] else text[:60]).strip()
        if self.status in (SOCKET_ERROR, GARBLED):
            return f"{self.status}: {(self.message or '')[:40]}"
        return self.status


def classify(reply: Any) -> tuple[str, str | None, str | None, str | None]:
    """(status, kind, reason, message) of a decoded reply: an action (`[action, info]`), an error reply
    (`{"error": text, "kind": ..., "reason": ...}`), or anything else (garbled)."""
    if isinstance(reply, dict) and "error" in reply:
        kind, reason = reply.get("kind"), reply.get("reason")
        return (ERROR, kind if isinstance(kind, str) else None, reason if isinstance(reason, str) else None,
                str(reply["error"]))
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], dict):
        return ACTION, None, None, None
    return GARBLED, None, None, f"unexpected reply: {type(reply).__name__}"


# ---------------------------------------------------------------------------------------------------------
# the robot


NextRequest = Callable[["Robot"], "Request | None"]  # None: this robot is done (a request budget ran out)
OnOutcome = Callable[[Outcome], None]


class Robot:
    """One simulated robot: one REQ socket per server it talks to, one request outstanding at a time."""

    def __init__(self, index: int, ctx: zmq.asyncio.Context, next_request: NextRequest, on_outcome: OnOutcome,
                 *, rate_hz: float | None = None, phase: float = 0.0, pause_s: float = 0.0, error_pause_s: float = 0.0):
        self.index = index
        self.ctx = ctx
        self.next_request = next_request
        self.on_outcome = on_outcome
        self.period = 1.0 / rate_hz if rate_hz else None
        self.phase = phase  # 0..1 of a period: robots at a rate are not in step
        self.pause_s = pause_s  # closed loop: a pause after each reply (a trickle rather than a flood)
        self.error_pause_s = error_pause_s  # closed loop: a pause after a failure, as a real robot backs off
        self.sent = 0  # requests handed to a socket (so far, by this robot)
        self.in_flight: Request | None = None  # still set after a cancelled run: in flight at stop
        self.stop_requested = False
        self._sockets: dict[str, zmq.asyncio.Socket] = {}

    def _socket(self, address: str) -> zmq.asyncio.Socket:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if address.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(address)
            self._sockets[address] = sock
        return sock

    def _drop(self, address: str) -> None:
        sock = self._sockets.pop(address, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for address in list(self._sockets):
            self._drop(address)

    async def one(self, request: Request) -> Outcome:
        """Send `request` and wait for its reply (at most its timeout); the outcome goes to `on_outcome` too."""
        sock = self._socket(request.address)
        self.sent += 1
        self.in_flight = request
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(sock.send(request.payload, copy=False), request.timeout_s)
            left = max(0.0, request.timeout_s - (time.perf_counter() - t0))
            raw = await asyncio.wait_for(sock.recv(copy=False), left)
        except asyncio.TimeoutError:
            self._drop(request.address)  # a new socket: a new identity, so a late reply is never read
            outcome = Outcome(request, self.index, t0, time.perf_counter(), TIMEOUT)
        except asyncio.CancelledError:
            self._drop(request.address)  # `in_flight` stays set: the caller counts it as in flight at stop
            raise
        except zmq.ZMQError as exc:
            self._drop(request.address)
            outcome = Outcome(request, self.index, t0, time.perf_counter(), SOCKET_ERROR, message=exc.strerror)
        else:
            done = time.perf_counter()
            try:
                reply = unpackb(raw.buffer)
            except CodecError as exc:
                outcome = Outcome(request, self.index, t0, done, GARBLED, message=f"undecodable reply: {exc.reason}")
            else:
                status, kind, reason, message = classify(reply)
                outcome = Outcome(request, self.index, t0, done, status, kind, reason, message, reply)
        self.in_flight = None
        self.on_outcome(outcome)
        return outcome

    async def run(self, stop_at: float) -> None:
        """Send until `stop_at` (perf_counter), `stop_requested`, or the scenario has no next request."""
        next_at = time.perf_counter() + (self.phase * self.period if self.period else 0.0)
        try:
            while not self.stop_requested:
                if self.period:
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at = max(next_at + self.period, time.perf_counter())  # late: skip ticks, never burst
                if time.perf_counter() >= stop_at or self.stop_requested:
                    return
                request = self.next_request(self)
                if request is None:
                    return
                outcome = await self.one(request)
                if not self.period:
                    pause = self.pause_s if outcome.status == ACTION else max(self.pause_s, self.error_pause_s)
                    if pause:
                        await asyncio.sleep(pause)
        finally:
            self.close()


async def run_robots(robots: Sequence[Robot], stop_at: float, drain_s: float) -> float:
    """Run `robots` until `stop_at` (perf_counter; math.inf: until each is done by itself); requests still on
    their way then get `drain_s` more; what is left is cancelled (its robot's `in_flight` stays set).
    Returns the time sending stopped (the end of a measured window). A robot's exception is raised."""
    tasks = [asyncio.ensure_future(r.run(stop_at)) for r in robots]
    try:
        timeout = None if math.isinf(stop_at) else max(0.0, stop_at - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        stopped_at = time.perf_counter()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=drain_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return stopped_at


# ---------------------------------------------------------------------------------------------------------
# load in the background


class BackgroundFleet:
    """Closed-loop robots on an event loop in their own thread, for callers that start load, watch it and stop
    it when a condition is met (autoscaling, a node lost). Robot i talks to target i mod n; each stops at
    `stop()`, after `max_requests`, or at `max_seconds`, whichever comes first: nothing here runs unbounded.

    `targets`: (host, port, embodiment tag, the embodiment's description from an `info` reply)."""

    def __init__(self, targets: list[tuple[str, int, str, dict[str, Any]]], robots: int, *, timeout_ms: int = 20_000,
                 max_requests: int = 20_000, max_seconds: float = 240.0, pause_s: float = 0.0):
        self.targets = targets
        self.robots = robots
        self.timeout_ms = timeout_ms
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause_s = pause_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._crew: list[Robot] = []
        self.answered: Counter[str] = Counter()  # embodiment -> actions received
        self.replicas: dict[str, Counter[str]] = {}  # embodiment -> replica id -> actions
        self.errors: Counter[str] = Counter()  # outcome label -> count
        self.errors_by_embodiment: dict[str, Counter[str]] = {}  # embodiment -> outcome label -> count
        self.error_log: list[tuple[float, str, str]] = []  # (unix time, embodiment, message), first 50
        self.last_ok: dict[str, float] = {}  # embodiment -> unix time of its latest action
        self.started_at = 0.0

    def _record(self, outcome: Outcome) -> None:
        tag = outcome.request.label
        with self._lock:
            if outcome.status == ACTION:
                served = outcome.server.get("embodiment_tag", tag)
                self.answered[served] += 1
                self.replicas.setdefault(served, Counter())[outcome.server.get("replica", "?")] += 1
                self.last_ok[served] = time.time()
                return
            self.errors[outcome.label] += 1
            self.errors_by_embodiment.setdefault(tag, Counter())[outcome.label] += 1
            if len(self.error_log) < 50:
                self.error_log.append((time.time(), tag, f"{outcome.label}: {(outcome.message or '')[:200]}"))

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        timeout_s = self.timeout_ms / 1000.0
        payloads = [build_payloads(Target(host, port), emb, 1, None, 2, seed=k)
                    for k, (host, port, _tag, emb) in enumerate(self.targets)]

        def next_request(robot: Robot) -> Request | None:
            if robot.sent >= self.max_requests:
                return None
            k = robot.index % len(self.targets)
            host, port, tag, _ = self.targets[k]
            return Request(Target(host, port).address, payloads[k][robot.sent % 2], timeout_s, tag)

        self._crew = [Robot(i, ctx, next_request, self._record, pause_s=self.pause_s, error_pause_s=0.05)
                      for i in range(self.robots)]
        ready.set()
        try:
            await run_robots(self._crew, time.perf_counter() + self.max_seconds, drain_s=timeout_s)
        finally:
            ctx.term()

    def start(self) -> "BackgroundFleet":
        self.started_at = time.time()
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(ready),), name="background-fleet",
                                        daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "answered": dict(self.answered),
                "replicas": {k: dict(v) for k, v in self.replicas.items()},
                "errors": dict(self.errors),
                "errors_by_embodiment": {k: dict(v) for k, v in self.errors_by_embodiment.items()},
                "last_ok": dict(self.last_ok),
            }

    def _request_stop(self) -> None:
        for robot in self._crew:
            robot.stop_requested = True

    def stop(self, join_timeout: float | None = None) -> None:
        """Stop every robot; each finishes (or times out) its request in flight first."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._request_stop)
            except RuntimeError:  # the loop ended by itself (max_seconds) meanwhile
                pass
        join_timeout = self.timeout_ms / 1000 + 5 if join_timeout is None else join_timeout
        if self._thread is not None:
            self._thread.join(join_timeout)
            if self._thread.is_alive():
                raise AssertionError(f"robots still running {join_timeout:.0f}s after stop")

    def __enter__(self) -> "BackgroundFleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except AssertionError:
            if exc[0] is None:
                raise
