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
import zmq.asyncio

from bench.report import Progress, fmt, plot_report, plot_sweep
from bench.robots import (ACTION, Outcome, Request, Robot, Target, as_target, build_payloads, embodiment_of,
                          fetch_info, parse_target, run_robots)
from bench.stats import summarize

__all__ = ["FleetReport", "merge_reports", "run_fleet", "run_fleet_sync", "run_sweep", "build_parser", "main"]

DEFAULT_TIMEOUT_MS = 30_000
PAYLOAD_POOL = 8  # distinct encoded observations per target, shared round-robin by its robots


# ---------------------------------------------------------------------------------------------------------
# report


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
# the fleet


class _Stats:
    """What the robots of one process measured (one event loop: no locks needed): the outcome sink."""

    def __init__(self, targets: list[Target]):
        self.answered = 0
        self.errors = 0
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
        self.per_target = {t.label: {"robots": 0, "sent": 0, "answered": 0, "errors": 0, "latencies": []}
                           for t in targets}
        self.crew: list[Robot] = []

    def in_window(self, now: float) -> bool:
        return self.window_start <= now <= self.window_end

    def in_flight(self) -> int:
        return sum(r.in_flight is not None for r in self.crew)

    def sent(self) -> int:
        return sum(r.sent for r in self.crew)

    def record(self, outcome: Outcome) -> None:
        per_target = self.per_target[outcome.request.label]
        per_target["sent"] += 1
        now = outcome.done_at
        if outcome.status != ACTION:
            self.errors += 1
            per_target["errors"] += 1
            self.kinds[outcome.label] += 1
            if self.in_window(now):
                self.window_errors += 1
            return
        latency_ms = outcome.latency_ms
        self.answered += 1
        per_target["answered"] += 1
        self.recent.append(latency_ms)
        if len(self.recent) > 20_000:
            del self.recent[:10_000]
        if not self.in_window(now):
            return
        self.latencies.append(latency_ms)
        per_target["latencies"].append(latency_ms)
        server = outcome.server
        if isinstance(server.get("batch_size"), (int, float)):
            self.batch_sizes.append(float(server["batch_size"]))
        if isinstance(server.get("replica"), str):
            self.replicas[server["replica"]] += 1
        for key, values in self.server.items():
            if isinstance(server.get(key), (int, float)):
                values.append(float(server[key]))
        if isinstance(server.get("infer_ms"), (int, float)):
            self.overheads.append(latency_ms - float(server["infer_ms"]))

    def progress(self) -> tuple[int, int, int, int, float]:
        recent = self.recent[-2000:]
        p50 = float(np.median(recent)) if recent else float("nan")
        return self.sent(), self.answered, self.errors, self.in_flight(), p50


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
    tlist = [as_target(t) for t in targets]
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
    left = [requests]  # the `requests` bound, shared by this process's robots

    def next_request(robot: Robot) -> Request | None:
        if left[0] is not None:
            if left[0] <= 0:
                return None
            left[0] -= 1
        t = tlist[robot.index % len(tlist)]
        pool = payloads[t.label]
        return Request(t.address, pool[(robot.index + robot.sent) % len(pool)], timeout_s, t.label)

    phases = np.random.default_rng(seed + 1).random(robots)
    for j in range(robots):
        k = robot_offset + j  # the robot's index in the whole fleet (several processes share one numbering)
        stats.crew.append(Robot(k, ctx, next_request, stats.record, rate_hz=rate_hz, phase=float(phases[j])))
        stats.per_target[tlist[k % len(tlist)].label]["robots"] += 1
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    started_unix = time.time()
    t_start = time.perf_counter()
    stop_at = t_start + duration_s if duration_s is not None else math.inf
    stats.window_start = t_start + warmup_s

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(progress_every_s)
            if progress is not None:
                progress(time.perf_counter() - t_start, *stats.progress())

    ticker = asyncio.ensure_future(report_progress())
    try:
        # Sending stops at stop_at (or, bounded by the request count alone, when the budget is spent); requests
        # on their way get `drain` more seconds; the window ends when sending stopped. It is set before the run:
        # the replies drained after it must not count in a window that ends before them (they added up to
        # robots / window to every closed-loop throughput: 16 robots over 15 s, +1.07 samples/s).
        stats.window_end = stop_at
        stopped = await run_robots(stats.crew, stop_at, drain)
        stats.window_end = min(stop_at, stopped)
    finally:
        ticker.cancel()
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
        per_target[name]["latency_ms"] = summarize(t["latencies"])
        per_target[name]["throughput_rps"] = round(len(t["latencies"]) / window_s, 3)
    return FleetReport(
        robots=robots,
        targets=[t.label for t in targets],
        batch=batch,
        rate_hz=rate_hz,
        duration_s=duration_s,
        warmup_s=warmup_s,
        processes=processes,
        sent=stats.sent(),
        answered=stats.answered,
        errors=stats.errors,
        in_flight_at_stop=stats.in_flight(),
        errors_by_kind=dict(stats.kinds),
        window_s=round(window_s, 3),
        window_answered=window_answered,
        window_errors=stats.window_errors,
        throughput_rps=round(window_answered / window_s, 3),
        samples_per_s=round(window_answered * batch / window_s, 3),
        latency_ms=summarize(stats.latencies),
        mean_batch_size=round(float(np.mean(stats.batch_sizes)), 3) if stats.batch_sizes else None,
        server_ms={k: (round(float(np.mean(v)), 3) if v else None) for k, v in stats.server.items()},
        replicas=dict(stats.replicas),
        overhead_ms=summarize(stats.overheads),
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
    targets = [as_target(t) for t in params.pop("targets")]
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
        latency_ms=summarize(latencies),
        mean_batch_size=(round(sum(b * n for b, n in batch_weighted) / max(1, sum(n for _, n in batch_weighted)), 3)
                         if batch_weighted else None),
        server_ms=server_ms,
        replicas=dict(replicas),
        # processes' overhead percentiles, weighted by replies (the raw values stay in the processes)
        overhead_ms={k: (sum(r.overhead_ms.get(k) or 0 for r in reports) if k == "n" else
                         round(sum((r.overhead_ms.get(k) or 0.0) * r.window_answered for r in reports) / max(1, answered), 3)
                         if all(r.overhead_ms.get(k) is not None for r in reports) else None)
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

    progress = None if args.quiet else Progress()
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
