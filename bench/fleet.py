"""`python -m bench.fleet`: a fleet of simulated robots hammering policy servers, and a report.

Hundreds of robots run in ONE process (asyncio + zmq.asyncio, one REQ socket each, no thread per robot);
`--processes K` spreads them over K processes when one event loop becomes the bottleneck. Each robot sends
`get_action` with a random observation shaped from the server's `info` reply, closed loop as fast as the
server answers (default) or at `--rate HZ`, and records the latency and `info["server"]["batch_size"]` of
every reply. Any server speaking the GR00T ZMQ protocol and answering `info` works: fleetserve, or
`bench/serial_server.py` (the upstream-shaped reference).

    python -m bench.fleet --ports 5555,5556 --robots 64 --duration 30 --plot fleet.png --json fleet.json
    python -m bench.fleet --target 10.0.0.5:5555 --robots 200 --rate 10 --processes 2 --duration 60
    python -m bench.fleet --ports 5555 --sweep 1,4,16,64 --duration 20 --plot sweep.png

Accounting: nothing is dropped silently. `sent == answered + errors + in_flight_at_stop` over the whole run.
A robot whose request times out counts a `timeout` error and rebuilds its socket (a REQ socket is stuck
otherwise). At the end of `--duration` no new request starts; the ones on their way get up to `--drain-s`
to come back (counted, but outside the measured window); what is still missing then is `in_flight_at_stop`.
Throughput, latency percentiles and the mean batch size are measured over the window from the end of
`--warmup` to the end of `--duration`, from the replies that arrived inside it.

Only numpy, pyzmq and msgpack are needed; matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import zmq
import zmq.asyncio

from clients.codec import CodecError, packb, unpackb
from clients.observations import random_observation

__all__ = [
    "FleetReport",
    "Target",
    "fetch_info",
    "parse_target",
    "plot_report",
    "plot_sweep",
    "run_fleet",
    "run_fleet_sync",
    "run_sweep",
]

DEFAULT_TIMEOUT_MS = 30_000
PAYLOAD_POOL = 8  # distinct encoded observations per target, shared round-robin by its robots


# ---------------------------------------------------------------------------------------------------------
# targets


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


def _as_target(t: Target | str | int) -> Target:
    if isinstance(t, Target):
        return t
    return parse_target(str(t))


# ---------------------------------------------------------------------------------------------------------
# report


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"min": None, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "min": round(float(arr.min()), 3),
        "mean": round(float(arr.mean()), 3),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(arr.max()), 3),
    }


@dataclass
class FleetReport:
    """What a fleet run measured. `to_json()` is what `--json` writes (latencies left out unless asked)."""

    robots: int
    targets: list[str]
    batch: int  # observation batch B per request
    rate_hz: float | None  # per robot; None = closed loop, as fast as answered
    duration_s: float | None  # asked (None: bounded by the request count alone)
    warmup_s: float
    processes: int
    # whole run (warmup + window + drain): the accounting identity holds on these
    sent: int = 0
    answered: int = 0
    errors: int = 0
    in_flight_at_stop: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    # measured window: replies that arrived between the end of warmup and the end of the run
    window_s: float = 0.0
    window_answered: int = 0
    window_errors: int = 0
    throughput_rps: float = 0.0  # answered requests per second in the window
    samples_per_s: float = 0.0  # throughput_rps * batch
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    mean_batch_size: float | None = None  # mean of info["server"]["batch_size"] over the window's replies
    server_ms: dict[str, float | None] = field(default_factory=dict)  # means of queue_ms, infer_ms, total_ms
    replicas: dict[str, int] = field(default_factory=dict)  # window replies per info["server"]["replica"]
    # latency minus the server's own infer_ms, per reply: what the serving path adds around the forward pass
    overhead_ms: dict[str, float | None] = field(default_factory=dict)
    per_target: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0
    started_at: float = 0.0  # unix time
    label: str | None = None
    latencies: list[float] = field(default_factory=list, repr=False)  # window latencies (ms), for plots

    @property
    def consistent(self) -> bool:
        return self.sent == self.answered + self.errors + self.in_flight_at_stop

    def to_json(self, with_latencies: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["consistent"] = self.consistent
        if not with_latencies:
            out.pop("latencies")
        return out

    def summary(self) -> str:
        lat = self.latency_ms
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines = [
            f"{self.label + ': ' if self.label else ''}{self.robots} robots -> {', '.join(self.targets)} "
            f"(B={self.batch}, {'closed loop' if self.rate_hz is None else f'{self.rate_hz:g} Hz'}, "
            f"window {self.window_s:.1f} s)",
            f"  throughput {self.throughput_rps:.1f} req/s ({self.samples_per_s:.1f} samples/s); latency ms "
            f"p50 {fmt(lat.get('p50'))} p90 {fmt(lat.get('p90'))} p99 {fmt(lat.get('p99'))} max {fmt(lat.get('max'))}; "
            f"mean batch {fmt(self.mean_batch_size)}; serving overhead (latency - infer_ms) p50 "
            f"{fmt(self.overhead_ms.get('p50'))} ms"
            + (f"; {len(self.replicas)} replica(s) answered" if self.replicas else ""),
            f"  sent {self.sent} = answered {self.answered} + errors {self.errors} + in flight at stop "
            f"{self.in_flight_at_stop}{'' if self.consistent else '  (INCONSISTENT)'}",
        ]
        for kind, n in sorted(self.errors_by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"  error {n:6d} x {kind}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# info and observations


def fetch_info(target: Target | str, timeout_ms: int = 10_000, api_token: str | None = None,
               context: zmq.Context | None = None) -> dict[str, Any]:
    """The `info` reply of a server (blocking, bounded by `timeout_ms`); raises TimeoutError / RuntimeError."""
    target = _as_target(target)
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
                   count: int, seed: int, api_token: str | None = None) -> list[bytes]:
    """`count` distinct, already encoded get_action requests for `target` (robots share them round-robin)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        request: dict[str, Any] = {
            "endpoint": "get_action",
            "data": {"observation": random_observation(embodiment, batch, image_size=image_size, rng=rng), "options": None},
        }
        if api_token is not None:
            request["api_token"] = api_token
        if target.embodiment_tag:
            request["embodiment_tag"] = target.embodiment_tag
        out.append(packb(request))
    return out


# ---------------------------------------------------------------------------------------------------------
# the fleet


def _error_kind(reply: dict[str, Any]) -> str:
    """Group error replies by their kind and reason (`{"error": ..., "kind": ..., "reason": ...}`), or, from
    servers that send no kind (upstream's), by their message prefix: up to the first ':' (at most 60 characters)."""
    if isinstance(reply.get("kind"), str):
        reason = reply.get("reason")
        return f"error reply: {reply['kind']}" + (f" ({reason})" if isinstance(reason, str) else "")
    text = str(reply["error"])
    head = text.split(":", 1)[0] if ":" in text[:61] else text[:60]
    return f"error reply: {head.strip()}"


class _Stats:
    """Counters shared by the robots of one process (one event loop: no locks needed)."""

    def __init__(self, targets: list[Target]):
        self.sent = 0
        self.answered = 0
        self.errors = 0
        self.in_flight = 0
        self.kinds: Counter[str] = Counter()
        self.window_start = math.inf
        self.window_end = math.inf
        self.latencies: list[float] = []  # window only
        self.batch_sizes: list[float] = []
        self.replicas: Counter[str] = Counter()
        self.server: dict[str, list[float]] = {"queue_ms": [], "infer_ms": [], "total_ms": []}
        self.overheads: list[float] = []
        self.window_errors = 0
        self.recent: list[float] = []  # every latency, for the live p50
        self.per_target = {t.label: {"robots": 0, "sent": 0, "answered": 0, "errors": 0, "latencies": []} for t in targets}

    def in_window(self, now: float) -> bool:
        return self.window_start <= now <= self.window_end

    def progress(self) -> tuple[int, int, int, int, float]:
        recent = self.recent[-2000:]
        p50 = float(np.median(recent)) if recent else float("nan")
        return self.sent, self.answered, self.errors, self.in_flight, p50


class _Robot:
    def __init__(self, index: int, ctx: zmq.asyncio.Context, target: Target, payloads: list[bytes],
                 stats: _Stats, timeout_s: float, rate_hz: float | None, batch: int):
        self.index = index
        self.ctx = ctx
        self.target = target
        self.payloads = payloads
        self.stats = stats
        self.timeout_s = timeout_s
        self.period = None if not rate_hz else 1.0 / rate_hz
        self.batch = batch
        self.sock: zmq.asyncio.Socket | None = None
        self.tstats = stats.per_target[target.label]
        self.tstats["robots"] += 1

    def _open(self) -> None:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in self.target.host.strip("[]"):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.target.address)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def _error(self, kind: str, now: float) -> None:
        self.stats.errors += 1
        self.tstats["errors"] += 1
        self.stats.kinds[kind] += 1
        if self.stats.in_window(now):
            self.stats.window_errors += 1

    async def one(self, payload: bytes) -> None:
        """One request, accounted exactly once: answered, an error, or (cancelled) in flight at stop."""
        st = self.stats
        if self.sock is None:
            self._open()
        st.sent += 1
        st.in_flight += 1
        self.tstats["sent"] += 1
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.sock.send(payload, copy=False), self.timeout_s)
            raw = await asyncio.wait_for(self.sock.recv(copy=False), max(0.0, self.timeout_s - (time.perf_counter() - t0)))
        except asyncio.TimeoutError:
            st.in_flight -= 1
            self.close()  # a REQ socket that got no reply is stuck: rebuild it (new identity, no stale reply)
            self._error("timeout", time.perf_counter())
            return
        except asyncio.CancelledError:
            self.close()  # stays counted in in_flight: the caller reports it as in flight at stop
            raise
        except zmq.ZMQError as exc:
            st.in_flight -= 1
            self.close()
            self._error(f"socket error: {exc.strerror}", time.perf_counter())
            return
        now = time.perf_counter()
        st.in_flight -= 1
        latency_ms = (now - t0) * 1000.0
        try:
            reply = unpackb(raw.buffer)
        except CodecError as exc:
            self._error(f"undecodable reply: {exc.reason[:40]}", now)
            return
        if isinstance(reply, dict) and "error" in reply:
            self._error(_error_kind(reply), now)
            return
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], dict)):
            self._error(f"unexpected reply: {type(reply).__name__}", now)
            return
        st.answered += 1
        self.tstats["answered"] += 1
        st.recent.append(latency_ms)
        if len(st.recent) > 20_000:
            del st.recent[:10_000]
        if st.in_window(now):
            st.latencies.append(latency_ms)
            self.tstats["latencies"].append(latency_ms)
            server = reply[1].get("server") if isinstance(reply[1], dict) else None
            if isinstance(server, dict):
                bs = server.get("batch_size")
                if isinstance(bs, (int, float)):
                    st.batch_sizes.append(float(bs))
                replica = server.get("replica")
                if isinstance(replica, str):
                    st.replicas[replica] += 1
                for key, values in st.server.items():
                    v = server.get(key)
                    if isinstance(v, (int, float)):
                        values.append(float(v))
                infer = server.get("infer_ms")
                if isinstance(infer, (int, float)):
                    st.overheads.append(latency_ms - float(infer))

    async def run(self, stop_at: float, budget: "_Budget", phase: float) -> None:
        n = self.index
        next_at = time.perf_counter() + (phase * self.period if self.period else 0.0)
        while True:
            if self.period:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + self.period, time.perf_counter())  # late: skip ticks, never burst
            if time.perf_counter() >= stop_at or not budget.take():
                return
            await self.one(self.payloads[n % len(self.payloads)])
            n += 1


class _Budget:
    """The `--requests N` bound, shared by the robots of one process."""

    def __init__(self, total: int | None):
        self.left = total

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


ProgressFn = Callable[[float, int, int, int, int, float], None]  # elapsed, sent, answered, errors, in flight, p50


async def run_fleet(
    targets: Sequence[Target | str],
    robots: int,
    duration_s: float | None = 10.0,
    *,
    requests: int | None = None,
    warmup_s: float = 0.0,
    rate_hz: float | None = None,
    batch: int = 1,
    image_size: tuple[int, int] | None = None,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    drain_s: float | None = None,
    api_token: str | None = None,
    embodiments: dict[str, dict[str, Any]] | None = None,
    progress: ProgressFn | None = None,
    progress_every_s: float = 1.0,
    seed: int = 0,
    label: str | None = None,
    start_at: float | None = None,
    robot_offset: int = 0,
    total_robots: int | None = None,
) -> FleetReport:
    """Run `robots` robots against `targets` (spread round-robin) and report.

    Bounded always: by `duration_s` (seconds of sending, warmup included) and/or `requests` (total sent).
    `embodiments` maps a target's label to its embodiment description (one entry of an `info` reply's
    `embodiments`); targets not in it are asked `info` first. `start_at` (unix time) synchronises processes.
    """
    if duration_s is None and requests is None:
        raise ValueError("run_fleet: give duration_s and/or requests (a fleet run is always bounded)")
    if robots < 1:
        raise ValueError(f"robots: expected at least 1, got {robots}")
    tlist = [_as_target(t) for t in targets]
    if not tlist:
        raise ValueError("targets: expected at least one server address")
    timeout_s = timeout_ms / 1000.0
    drain = timeout_s if drain_s is None else drain_s
    total_robots = total_robots or robots
    described = dict(embodiments or {})
    payloads: dict[str, list[bytes]] = {}
    for i, t in enumerate(tlist):
        if t.label not in described:
            info = await asyncio.to_thread(fetch_info, t, min(timeout_ms, 30_000), api_token)
            described[t.label] = embodiment_of(info, t)
        n_robots_here = len(range(i, total_robots, len(tlist)))
        payloads[t.label] = build_payloads(t, described[t.label], batch, image_size,
                                           max(1, min(PAYLOAD_POOL, n_robots_here)), seed + 7919 * i, api_token)

    ctx = zmq.asyncio.Context(io_threads=2 if robots > 64 else 1)
    stats = _Stats(tlist)
    fleet = []
    for j in range(robots):
        k = robot_offset + j  # the robot's index in the whole fleet (several processes share one numbering)
        t = tlist[k % len(tlist)]
        fleet.append(_Robot(k, ctx, t, payloads[t.label], stats, timeout_s, rate_hz, batch))
    for r in fleet:
        r._open()
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    started_unix = time.time()
    t_start = time.perf_counter()
    stop_at = t_start + duration_s if duration_s is not None else math.inf
    stats.window_start = t_start + warmup_s
    budget = _Budget(requests)
    phases = np.random.default_rng(seed + 1).random(robots)
    tasks = [asyncio.ensure_future(r.run(stop_at, budget, float(phases[i]))) for i, r in enumerate(fleet)]

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(progress_every_s)
            if progress is not None:
                progress(time.perf_counter() - t_start, *stats.progress())

    ticker = asyncio.ensure_future(report_progress())
    try:
        if duration_s is not None:
            # Sending stops at stop_at; requests on their way get `drain` more seconds.
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, stop_at - time.perf_counter()))
            stats.window_end = time.perf_counter()
            if pending:
                done, pending = await asyncio.wait(pending, timeout=drain)
        else:
            # Bounded by the request count alone: every robot's last request is bounded by the timeout.
            done, pending = await asyncio.wait(tasks)
            stats.window_end = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        ticker.cancel()
        for r in fleet:
            r.close()
        ctx.term()
    wall = time.perf_counter() - t_start
    return _report(stats, tlist, robots, batch, rate_hz, duration_s, warmup_s, 1, wall, started_unix, label,
                   stats.window_end - stats.window_start)


def _report(stats: _Stats, targets: list[Target], robots: int, batch: int, rate_hz: float | None,
            duration_s: float | None, warmup_s: float, processes: int, wall: float, started: float,
            label: str | None, window_s: float) -> FleetReport:
    window_s = max(window_s, 1e-9)
    window_answered = len(stats.latencies)
    per_target = {}
    for name, t in stats.per_target.items():
        per_target[name] = {k: v for k, v in t.items() if k != "latencies"}
        per_target[name]["latency_ms"] = _percentiles(t["latencies"])
        per_target[name]["throughput_rps"] = round(len(t["latencies"]) / window_s, 3)
    return FleetReport(
        robots=robots,
        targets=[t.label for t in targets],
        batch=batch,
        rate_hz=rate_hz,
        duration_s=duration_s,
        warmup_s=warmup_s,
        processes=processes,
        sent=stats.sent,
        answered=stats.answered,
        errors=stats.errors,
        in_flight_at_stop=stats.in_flight,
        errors_by_kind=dict(stats.kinds),
        window_s=round(window_s, 3),
        window_answered=window_answered,
        window_errors=stats.window_errors,
        throughput_rps=round(window_answered / window_s, 3),
        samples_per_s=round(window_answered * batch / window_s, 3),
        latency_ms=_percentiles(stats.latencies),
        mean_batch_size=round(float(np.mean(stats.batch_sizes)), 3) if stats.batch_sizes else None,
        server_ms={k: (round(float(np.mean(v)), 3) if v else None) for k, v in stats.server.items()},
        replicas=dict(stats.replicas),
        overhead_ms=_percentiles(stats.overheads),
        per_target=per_target,
        wall_s=round(wall, 3),
        started_at=started,
        label=label,
        latencies=[round(x, 3) for x in stats.latencies],
    )


def run_fleet_sync(*args: Any, **kwargs: Any) -> FleetReport:
    """`run_fleet` for callers without an event loop (spreads over processes when `processes` > 1)."""
    processes = int(kwargs.pop("processes", 1) or 1)
    if processes > 1:
        return _run_multiprocess(processes, args, kwargs)
    return asyncio.run(run_fleet(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------------
# several processes


def _child(conn, shared, slot: int, args: tuple, kwargs: dict) -> None:
    def progress(elapsed, sent, answered, errors, in_flight, p50):
        shared[slot * 5: slot * 5 + 5] = [sent, answered, errors, in_flight, p50]

    try:
        report = asyncio.run(run_fleet(*args, progress=progress, progress_every_s=0.5, **kwargs))
        conn.send(("ok", report))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run_multiprocess(processes: int, args: tuple, kwargs: dict) -> FleetReport:
    import multiprocessing as mp

    params = dict(zip(("targets", "robots", "duration_s"), args))
    params.update(kwargs)
    robots = int(params.pop("robots"))
    targets = [_as_target(t) for t in params.pop("targets")]
    progress = params.pop("progress", None)
    progress_every_s = params.pop("progress_every_s", 1.0)
    requests = params.pop("requests", None)
    processes = max(1, min(processes, robots))
    # Ask info once here, so K processes do not all do it and every child builds the same observations.
    timeout_ms = params.get("timeout_ms", DEFAULT_TIMEOUT_MS)
    embodiments = dict(params.pop("embodiments", None) or {})
    for t in targets:
        if t.label not in embodiments:
            embodiments[t.label] = embodiment_of(fetch_info(t, min(timeout_ms, 30_000), params.get("api_token")), t)
    spawn = mp.get_context("spawn")
    shared = spawn.Array("d", processes * 5, lock=False)
    start_at = time.time() + 3.0 + 0.5 * processes  # spawned interpreters import numpy/zmq first
    children = []
    offset = 0
    for k in range(processes):
        n = robots // processes + (k < robots % processes)
        child_requests = None if requests is None else requests // processes + (k < requests % processes)
        parent_conn, child_conn = spawn.Pipe(duplex=False)
        kw = dict(params, requests=child_requests, embodiments=embodiments, start_at=start_at, robot_offset=offset,
                  total_robots=robots)
        proc = spawn.Process(target=_child, args=(child_conn, shared, k, (targets, n), kw), daemon=True)
        proc.start()
        child_conn.close()
        children.append((proc, parent_conn))
        offset += n
    results: list[FleetReport] = []
    failures = []
    t0 = None
    pending = list(children)
    while pending:
        for proc, conn in list(pending):
            if conn.poll(0.1):
                status, value = conn.recv()
                (results if status == "ok" else failures).append(value)
                pending.remove((proc, conn))
                proc.join(timeout=10)
            elif not proc.is_alive():
                failures.append(f"fleet process {proc.pid} died with exit code {proc.exitcode}")
                pending.remove((proc, conn))
        if progress is not None and time.time() >= start_at:
            t0 = t0 or time.perf_counter()
            if time.perf_counter() - t0 >= progress_every_s:
                t0 = time.perf_counter()
                rows = [shared[i * 5: i * 5 + 5] for i in range(processes)]
                p50s = [r[4] for r in rows if r[4] == r[4] and r[1] > 0]
                progress(time.time() - start_at, *(int(sum(r[i] for r in rows)) for i in range(4)),
                         float(np.median(p50s)) if p50s else float("nan"))
    if failures:
        raise RuntimeError("fleet processes failed: " + "; ".join(failures))
    return merge_reports(results, label=params.get("label"))


def merge_reports(reports: Sequence[FleetReport], label: str | None = None) -> FleetReport:
    """One report from the reports of processes that ran side by side (same targets, same window)."""
    first = reports[0]
    window_s = float(np.mean([r.window_s for r in reports]))
    latencies = [x for r in reports for x in r.latencies]
    kinds: Counter[str] = Counter()
    for r in reports:
        kinds.update(r.errors_by_kind)
    batch_weighted = [(r.mean_batch_size, r.window_answered) for r in reports if r.mean_batch_size is not None]
    per_target: dict[str, dict[str, Any]] = {}
    for r in reports:
        for name, t in r.per_target.items():
            agg = per_target.setdefault(name, {"robots": 0, "sent": 0, "answered": 0, "errors": 0, "throughput_rps": 0.0})
            for k in ("robots", "sent", "answered", "errors", "throughput_rps"):
                agg[k] += t[k]
    server_ms = {}
    for key in first.server_ms:
        vals = [(r.server_ms.get(key), r.window_answered) for r in reports if r.server_ms.get(key) is not None]
        server_ms[key] = round(sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)), 3) if vals else None
    answered = sum(r.window_answered for r in reports)
    replicas: Counter[str] = Counter()
    for r in reports:
        replicas.update(r.replicas)
    return FleetReport(
        robots=sum(r.robots for r in reports),
        targets=first.targets,
        batch=first.batch,
        rate_hz=first.rate_hz,
        duration_s=first.duration_s,
        warmup_s=first.warmup_s,
        processes=len(reports),
        sent=sum(r.sent for r in reports),
        answered=sum(r.answered for r in reports),
        errors=sum(r.errors for r in reports),
        in_flight_at_stop=sum(r.in_flight_at_stop for r in reports),
        errors_by_kind=dict(kinds),
        window_s=round(window_s, 3),
        window_answered=answered,
        window_errors=sum(r.window_errors for r in reports),
        throughput_rps=round(sum(r.throughput_rps for r in reports), 3),
        samples_per_s=round(sum(r.samples_per_s for r in reports), 3),
        latency_ms=_percentiles(latencies),
        mean_batch_size=(round(sum(b * n for b, n in batch_weighted) / max(1, sum(n for _, n in batch_weighted)), 3)
                         if batch_weighted else None),
        server_ms=server_ms,
        replicas=dict(replicas),
        # processes' overhead percentiles, weighted by replies (the raw values stay in the processes)
        overhead_ms={k: (round(sum((r.overhead_ms.get(k) or 0.0) * r.window_answered for r in reports)
                               / max(1, answered), 3) if all(r.overhead_ms.get(k) is not None for r in reports) else None)
                     for k in first.overhead_ms},
        per_target=per_target,
        wall_s=max(r.wall_s for r in reports),
        started_at=min(r.started_at for r in reports),
        label=label if label is not None else first.label,
        latencies=latencies,
    )


# ---------------------------------------------------------------------------------------------------------
# sweeps


def run_sweep(targets: Sequence[Target | str], robot_counts: Iterable[int], duration_s: float | None = 10.0,
              *, on_report: Callable[[FleetReport], None] | None = None, **kwargs: Any) -> list[FleetReport]:
    """One fleet run per robot count, one after the other, against the same targets."""
    reports = []
    for n in robot_counts:
        report = run_fleet_sync(targets, int(n), duration_s, **kwargs)
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports


# ---------------------------------------------------------------------------------------------------------
# plots (matplotlib only here, imported lazily)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib (pip install matplotlib); the run itself does not") from exc
    return plt


def plot_report(report: FleetReport | Sequence[FleetReport], path: str, title: str | None = None) -> str:
    """Latency distribution (histogram and CDF) of one or more runs, to a PNG."""
    plt = _pyplot()
    reports = [report] if isinstance(report, FleetReport) else list(report)
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    every = [x for r in reports for x in r.latencies if x > 0]
    wide = bool(every) and max(every) / max(min(every), 1e-3) > 20  # decades apart: log axes
    bins: Any = 60
    if wide:
        bins = np.geomspace(max(min(every), 1e-3), max(every), 80)
    for r in reports:
        if not r.latencies:
            continue
        name = r.label or f"{r.robots} robots"
        lat = np.sort(np.asarray(r.latencies))
        ax_h.hist(lat, bins=bins, alpha=0.5, label=f"{name} (p50 {np.median(lat):.1f} ms)")
        ax_c.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=name)
    if wide:
        ax_h.set_xscale("log")
        ax_c.set_xscale("log")
    ax_h.set_xlabel("latency (ms)")
    ax_h.set_ylabel("replies")
    ax_h.set_title("latency histogram")
    ax_c.set_xlabel("latency (ms)")
    ax_c.set_ylabel("fraction of replies")
    ax_c.set_title("latency CDF")
    ax_c.grid(alpha=0.3)
    for ax in (ax_h, ax_c):
        if any(r.latencies for r in reports):
            ax.legend(fontsize=8)
    fig.suptitle(title or "fleet latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(series: dict[str, Sequence[FleetReport]] | Sequence[FleetReport], path: str, title: str | None = None,
               limits: dict[str, float] | None = None) -> str:
    """Throughput and p99 latency against the number of robots, one line per labelled series.

    `limits`: horizontal reference lines on the throughput panel (e.g. {"in-process limit, B=16": 21.3}).
    """
    plt = _pyplot()
    if not isinstance(series, dict):
        series = {"fleet": list(series)}
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, reports in series.items():
        reports = sorted(reports, key=lambda r: r.robots)
        xs = [r.robots for r in reports]
        ax_t.plot(xs, [r.samples_per_s for r in reports], marker="o", label=name)
        ax_p.plot(xs, [r.latency_ms.get("p99") or float("nan") for r in reports], marker="o", label=f"{name} p99")
        ax_p.plot(xs, [r.latency_ms.get("p50") or float("nan") for r in reports], marker=".", linestyle=":",
                  label=f"{name} p50")
    for name, value in (limits or {}).items():
        ax_t.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax_t.text(0.01, value, name, transform=ax_t.get_yaxis_transform(), fontsize=7, va="bottom", color="gray")
    for ax in (ax_t, ax_p):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("robots")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_t.set_ylabel("throughput (samples/s)")
    ax_t.set_title("throughput")
    ax_p.set_yscale("log")
    ax_p.set_ylabel("latency (ms)")
    ax_p.set_title("latency")
    fig.suptitle(title or "fleet sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# CLI


class _Progress:
    """One line refreshed in place on a TTY; a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr, every_s: float = 5.0, prefix: str = ""):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self.prefix = prefix
        self._last_line = -math.inf
        self._last = (0.0, 0)
        self.dirty = False

    def __call__(self, elapsed, sent, answered, errors, in_flight, p50) -> None:
        if not self.tty and elapsed - self._last_line < self.every_s:
            return
        t_prev, n_prev = self._last  # req/s since the previous line shown
        rate = (answered - n_prev) / (elapsed - t_prev) if elapsed > t_prev else 0.0
        self._last = (elapsed, answered)
        p50_text = "-" if p50 != p50 else f"{p50:.1f} ms"
        line = (f"{self.prefix}{elapsed:6.1f}s sent {sent} answered {answered} ({rate:.1f} req/s) "
                f"p50 {p50_text} errors {errors} in flight {in_flight}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.dirty = True
        else:
            self._last_line = elapsed
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False
        self._last = (0.0, 0)
        self._last_line = -math.inf


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _image_size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW such as 224x224, got {text!r}")
    return int(h), int(w)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description="Simulated robot fleet: N REQ robots send get_action to GR00T-protocol servers and report "
        "throughput, latency percentiles, errors and the server's batch sizes.",
    )
    p.add_argument("--target", action="append", default=[], metavar="HOST:PORT[/TAG]",
                   help="a server address (repeat for several; robots spread round-robin); /TAG sends embodiment_tag")
    p.add_argument("--ports", type=_int_list, default=None, help="shorthand: comma-separated ports on --host")
    p.add_argument("--host", default="127.0.0.1", help="host for --ports (default 127.0.0.1)")
    p.add_argument("--robots", type=int, default=16, help="robots (REQ sockets) in the fleet (default 16)")
    p.add_argument("--sweep", type=_int_list, default=None, metavar="N1,N2,...",
                   help="run once per robot count and plot throughput and p99 against robots")
    p.add_argument("--duration", type=float, default=None, help="seconds to send, warmup included")
    p.add_argument("--requests", type=int, default=None, help="total requests to send (per sweep point)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds left out of the measured window")
    p.add_argument("--rate", type=float, default=None, metavar="HZ",
                   help="control rate per robot; default closed loop, as fast as the server answers")
    p.add_argument("--batch", type=int, default=1, help="observation batch B per request (default 1)")
    p.add_argument("--image-size", type=_image_size, default=None, metavar="HxW",
                   help="camera image size (default: the model's own, from the server's info)")
    p.add_argument("--timeout-ms", type=int, default=DEFAULT_TIMEOUT_MS, help="per request (default 30000)")
    p.add_argument("--drain-s", type=float, default=None,
                   help="after --duration, how long requests on their way may still come back (default: the timeout)")
    p.add_argument("--processes", type=int, default=1, help="spread the robots over K processes")
    p.add_argument("--api-token", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the report(s) as JSON")
    p.add_argument("--latencies", action="store_true", help="include every window latency in the JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG (latency distribution, or the sweep)")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        targets = [parse_target(t, args.host) for t in args.target]
    except ValueError as exc:
        parser.error(str(exc))
    targets += [Target(args.host, port) for port in (args.ports or [])]
    if not targets:
        parser.error("give at least one --target HOST:PORT or --ports P1,P2")
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    if args.batch < 1 or args.robots < 1 or args.processes < 1:
        parser.error("--batch, --robots and --processes must be at least 1")
    if args.duration is not None and args.warmup >= args.duration:
        parser.error(f"--warmup ({args.warmup:g}) must be shorter than --duration ({args.duration:g})")

    progress = None if args.quiet else _Progress()
    kwargs = dict(requests=args.requests, warmup_s=args.warmup, rate_hz=args.rate, batch=args.batch,
                  image_size=args.image_size, timeout_ms=args.timeout_ms, drain_s=args.drain_s,
                  api_token=args.api_token, seed=args.seed, processes=args.processes, progress=progress)
    counts = args.sweep or [args.robots]
    reports: list[FleetReport] = []
    try:
        for n in counts:
            if progress is not None:
                progress.prefix = f"[{n} robots] " if args.sweep else ""
            try:
                report = run_fleet_sync(targets, n, args.duration, **kwargs)
            finally:
                if progress is not None:
                    progress.done()
            reports.append(report)
            print(report.summary(), flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if not reports:
            return 130
    except (TimeoutError, RuntimeError, ValueError) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc: Any = [r.to_json(args.latencies) for r in reports] if args.sweep else reports[0].to_json(args.latencies)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        if args.sweep:
            plot_sweep(reports, args.plot)
        else:
            plot_report(reports[0], args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r.consistent for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
