"""`python -m bench.soak`: robots, hostile robots and crashing replicas, for minutes; nothing may be lost.

    python -m bench.soak --target 127.0.0.1:5555 --target 127.0.0.1:5556 --robots 16 --duration 60 \\
        --hostile-rate 0.1 --kill-replicas-every 15 --app fleet --json soak.json

N robots (bench/robots.py: one event loop, one REQ socket each) send `get_action` for `--duration` seconds, closed loop, with
valid observations shaped from the server's `info` reply. A fraction `--hostile-rate` of the messages are
hostile instead (from tests/support/hostile_corpus.py, the generator the fuzz test uses). With `--kill-replicas-every S`,
every S seconds one policy replica of `--app` is killed with `ray.kill` (found among Ray's named actors,
`SERVE_REPLICA::<app>#<deployment>#<id>` in namespace "serve"; the ingress is spared); Ray is imported only
in that mode, and joined at `--ray-address` (default: the running local cluster).

What must hold (exit status 1 otherwise):
- lost == 0: every message got a reply within `--timeout-ms` (no reply at all is "lost");
- every hostile message got `{"error": ...}` naming its fault (`hostile_mismatch` counts the others);
- no good request got an error (`good_errors`, by kind: deadline, overloaded, policy, ...), and every
  action reply had the embodiment's action keys (`garbled` counts replies that did not decode or fit).

`run_soak(...)` returns the `SoakReport` for tests. numpy, pyzmq and msgpack only (plus ray in kill mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq.asyncio

from bench.robots import (ACTION, ERROR, TIMEOUT, Outcome, Request, Robot, Target, as_target, build_payloads,
                          embodiment_of, fetch_info, run_robots)
from bench.report import fmt
from bench.stats import summarize
from tests.support.hostile_corpus import HostileGenerator

__all__ = ["SoakReport", "run_soak", "policy_replicas", "kill_one_replica", "main"]

DEFAULT_TIMEOUT_MS = 20_000  # above the server's request_timeout_ms (12 s): a slow reply is an error, not lost
MAX_ROBOTS = 512
PAYLOAD_POOL = 8
MAX_EXAMPLES = 5
MAX_LATENCIES = 1_000_000
INGRESS_DEPLOYMENT = "ZmqIngress"


@dataclass
class SoakReport:
    targets: list[str]
    robots: int
    duration_s: float
    hostile_rate: float
    kill_every_s: float | None
    timeout_ms: int
    sent: int = 0
    sent_good: int = 0
    sent_hostile: int = 0
    answered: int = 0  # any reply at all
    actions: int = 0  # good requests answered with a well-formed action
    good_errors: dict[str, int] = field(default_factory=dict)  # good requests answered with an error, by kind
    hostile_errors: int = 0  # hostile messages answered with a fitting error (what must happen)
    hostile_mismatch: int = 0  # hostile messages answered otherwise (no error, or an error naming the wrong thing)
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # every error reply, good and hostile, by kind
    hostile_by_category: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # no reply within timeout_ms
    garbled: int = 0  # a reply that did not decode, or an action reply of the wrong form
    kills: list[dict[str, Any]] = field(default_factory=list)  # {"t": s since start, "replica": actor name}
    kill_failures: list[str] = field(default_factory=list)
    kills_skipped: int = 0  # rounds where no deployment was fully up (still replacing the last one killed)
    replicas_seen: list[str] = field(default_factory=list)  # info["server"]["replica"] of the actions
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # of good requests answered with an action
    throughput_rps: float = 0.0
    elapsed_s: float = 0.0
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few messages per failure class

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.good_errors and self.hostile_mismatch == 0 and self.garbled == 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        lat = self.latency_ms
        lines = [
            f"soak: {self.robots} robots -> {', '.join(self.targets)} for {self.elapsed_s:.1f} s, hostile "
            f"{self.hostile_rate:.0%}, " + (f"a replica killed every {self.kill_every_s:g} s" if self.kill_every_s else "no kills"),
            f"  sent {self.sent} (good {self.sent_good}, hostile {self.sent_hostile}); answered {self.answered}; "
            f"lost {self.lost}",
            f"  good: {self.actions} actions, {sum(self.good_errors.values())} errors {dict(self.good_errors) or ''}; "
            f"{self.throughput_rps:.1f} req/s; latency ms p50 {fmt(lat.get('p50'))} p99 {fmt(lat.get('p99'))} "
            f"max {fmt(lat.get('max'))}",
            f"  hostile: {self.hostile_errors} answered with a fitting error, {self.hostile_mismatch} otherwise; "
            f"garbled replies {self.garbled}",
            f"  errors by kind {dict(sorted(self.errors_by_kind.items()))}",
            f"  replicas killed {len(self.kills)}"
            + (f" ({len(self.kill_failures)} kill attempts failed)" if self.kill_failures else "")
            + (f" ({self.kills_skipped} rounds skipped: no deployment fully up)" if self.kills_skipped else "")
            + f"; replicas seen answering {len(self.replicas_seen)}",
        ]
        for kind, messages in self.examples.items():
            for m in messages:
                lines.append(f"  e.g. {kind}: {m}")
        lines.append("  OK" if self.ok else "  FAILED")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# replicas (kill mode; ray imported lazily)


def _ray():
    import ray

    return ray


def policy_replicas(app: str, spare: Sequence[str] = (INGRESS_DEPLOYMENT,)) -> list[str]:
    """Actor names of the live replicas of `app`'s deployments, except those named in `spare`."""
    ray = _ray()
    prefix = f"SERVE_REPLICA::{app}#"
    names = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        namespace = entry.get("namespace") if isinstance(entry, dict) else "serve"
        if namespace != "serve" or not name.startswith(prefix):
            continue
        deployment = name[len(prefix):].split("#", 1)[0]
        if deployment not in spare:
            names.append(name)
    return sorted(names)


def _healthy_deployments(app: str) -> set[str] | None:
    """Deployments of `app` that Serve reports HEALTHY (every replica up); None when Serve cannot tell."""
    try:
        from ray import serve

        status = serve.status().applications.get(app)
    except Exception:  # noqa: BLE001 - no Serve controller reachable from here: do not filter
        return None
    if status is None:
        return set()
    return {name for name, d in status.deployments.items() if str(getattr(d.status, "value", d.status)) == "HEALTHY"}


def kill_one_replica(app: str, rng: np.random.Generator, spare: Sequence[str] = (INGRESS_DEPLOYMENT,),
                     only_healthy: bool = True) -> str | None:
    """Kill one live replica of `app` (not the spared deployments); its actor name, or None if none qualifies.

    `only_healthy`: pick only among deployments Serve reports HEALTHY, so a kill never lands on a deployment
    still replacing the replica killed last time (two faults at once are a different test).
    """
    ray = _ray()
    names = policy_replicas(app, spare)
    if only_healthy:
        healthy = _healthy_deployments(app)
        if healthy is not None:
            prefix = f"SERVE_REPLICA::{app}#"
            names = [n for n in names if n[len(prefix):].split("#", 1)[0] in healthy]
    if not names:
        return None
    name = names[int(rng.integers(len(names)))]
    try:
        actor = ray.get_actor(name, namespace="serve")
    except ValueError:  # died (or was replaced) between the listing and now
        return None
    # A crash, as far as Serve can tell: the actor dies; Serve's controller notices and starts a new replica.
    ray.kill(actor, no_restart=True)
    return name


def _ensure_ray(address: str | None) -> None:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address or "auto", log_to_driver=False, configure_logging=False)


# ---------------------------------------------------------------------------------------------------------
# robots


@dataclass
class _TargetPlan:
    target: Target
    embodiment: dict[str, Any]
    served: list[str]
    good: list[bytes]
    action_keys: frozenset
    max_batch: int


@dataclass
class _Tally:
    """What the soak's robots saw, outcome by outcome (one event loop: no locks needed)."""

    sent_good: int = 0
    sent_hostile: int = 0
    answered: int = 0
    actions: int = 0
    good_errors: Counter = field(default_factory=Counter)
    errors_by_kind: Counter = field(default_factory=Counter)
    hostile_by_category: Counter = field(default_factory=Counter)
    hostile_errors: int = 0
    hostile_mismatch: int = 0
    lost: int = 0
    garbled: int = 0
    latencies: list[float] = field(default_factory=list)
    replicas: set = field(default_factory=set)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def example(self, kind: str, text: str) -> None:
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(text[:300])

    def record(self, outcome: Outcome, plan: _TargetPlan, unauthorized_ok: bool) -> None:
        """Judge one reply: a hostile message must get a fitting error; a good one an action of the right form."""
        hostile = outcome.request.label
        if hostile is not None:
            self.sent_hostile += 1
            self.hostile_by_category[hostile.category] += 1
        else:
            self.sent_good += 1
        if outcome.status == TIMEOUT:
            self.lost += 1
            self.example("lost", f"{'hostile ' + hostile.category if hostile else 'good get_action'}: "
                                 f"no reply within {outcome.request.timeout_s * 1000:.0f} ms")
            return
        if outcome.reply is None:  # no reply, a socket error, or one that did not decode
            self.garbled += 1
            self.example("garbled", outcome.label)
            return
        self.answered += 1
        if outcome.status == ERROR:
            self.errors_by_kind[outcome.label] += 1
        if hostile is not None:  # any decoded reply to a hostile message is judged by what it had to say
            why = hostile.check(outcome.reply)
            if why is not None and unauthorized_ok and outcome.kind == "unauthorized":
                why = None
            if why is None:
                self.hostile_errors += 1
            else:
                self.hostile_mismatch += 1
                self.example("hostile_mismatch", f"{hostile.category}: {why}")
            return
        if outcome.status == ERROR:
            self.good_errors[outcome.label] += 1
            self.example(f"good_error:{outcome.label}", outcome.message or "")
            return
        if outcome.status != ACTION or frozenset(outcome.reply[0]) != plan.action_keys:
            self.garbled += 1
            self.example("garbled", f"not an action reply: {str(outcome.reply)[:200]}")
            return
        self.actions += 1
        if len(self.latencies) < MAX_LATENCIES:
            self.latencies.append(outcome.latency_ms)
        if outcome.server.get("replica"):
            self.replicas.add(str(outcome.server["replica"]))


def _plan(target: Target, *, timeout_ms: int, api_token: str | None, seed: int, batch: int,
          image_size: tuple[int, int] | None, max_batch: int | None) -> _TargetPlan:
    info = fetch_info(target, timeout_ms=timeout_ms, api_token=api_token)
    emb = embodiment_of(info, target)
    good = build_payloads(target, emb, batch, image_size, PAYLOAD_POOL, seed, api_token)
    limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
    cap = max_batch or limits.get("max_batch_per_request") or 64
    return _TargetPlan(target, emb, sorted(info["embodiments"]), good, frozenset(emb["action_dims"]), int(cap))


def run_soak(
    targets: Sequence[Target | str],
    robots: int,
    duration_s: float,
    *,
    hostile_rate: float = 0.1,
    kill_every_s: float | None = None,
    app: str | None = None,
    spare: Sequence[str] = (INGRESS_DEPLOYMENT,),
    ray_address: str | None = None,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    api_token: str | None = None,
    batch: int = 1,
    image_size: tuple[int, int] | None = None,
    max_batch_per_request: int | None = None,
    seed: int = 0,
    log=None,
) -> SoakReport:
    """Run the soak (blocking, about `duration_s` + at most `timeout_ms`) and return its report."""
    if not 1 <= robots <= MAX_ROBOTS:
        raise ValueError(f"robots: expected 1 to {MAX_ROBOTS}, got {robots}")
    if duration_s <= 0:
        raise ValueError(f"duration: expected seconds > 0, got {duration_s}")
    if not 0.0 <= hostile_rate <= 1.0:
        raise ValueError(f"hostile_rate: expected a fraction from 0 to 1, got {hostile_rate}")
    if kill_every_s is not None and (kill_every_s <= 0 or not app):
        raise ValueError("kill_every_s: needs a positive period and the app name (--app)")
    parsed = [as_target(t) for t in targets]
    if not parsed:
        raise ValueError("targets: expected at least one --target")
    plans = [
        _plan(t, timeout_ms=timeout_ms, api_token=api_token, seed=seed + k, batch=batch, image_size=image_size,
              max_batch=max_batch_per_request)
        for k, t in enumerate(parsed)
    ]
    if kill_every_s is not None:
        _ensure_ray(ray_address)
        if not policy_replicas(app, spare):
            raise ValueError(f"--app {app!r}: no replica to kill (no live SERVE_REPLICA::{app}#... actor but the spared {list(spare)})")
    report = SoakReport([p.target.label for p in plans], robots, duration_s, hostile_rate, kill_every_s, timeout_ms)
    tally = _Tally()
    timeout_s = timeout_ms / 1000.0
    rngs = [np.random.default_rng([seed, i]) for i in range(robots)]
    hostiles = [HostileGenerator(plans[i % len(plans)].embodiment, seed=seed * 1_000_003 + i,
                                 served_tags=plans[i % len(plans)].served, tag=plans[i % len(plans)].target.embodiment_tag,
                                 max_batch_per_request=plans[i % len(plans)].max_batch) for i in range(robots)]

    def next_request(robot: Robot) -> Request:
        plan = plans[robot.index % len(plans)]
        if rngs[robot.index].random() < hostile_rate:
            hostile = hostiles[robot.index].next()
            return Request(plan.target.address, hostile.payload, timeout_s, hostile)
        return Request(plan.target.address, plan.good[(robot.index + robot.sent) % len(plan.good)], timeout_s)

    def judge(outcome: Outcome) -> None:
        tally.record(outcome, plans[outcome.robot % len(plans)], unauthorized_ok=api_token is not None)

    stop_kills = threading.Event()

    def kill_now_and_then(t_start: float, stop_at: float) -> None:
        rng = np.random.default_rng(seed)
        next_kill = t_start + kill_every_s
        while next_kill < stop_at and not stop_kills.wait(max(0.0, next_kill - time.monotonic())):
            try:
                name = kill_one_replica(app, rng, spare)
            except Exception as exc:  # noqa: BLE001 - a failed kill is reported, the soak goes on
                report.kill_failures.append(f"{type(exc).__name__}: {exc}"[:300])
                name = None
            if name is not None:
                report.kills.append({"t": round(time.monotonic() - t_start, 2), "replica": name})
                if log:
                    log(f"[{time.monotonic() - t_start:6.1f}s] killed {name}")
            else:
                report.kills_skipped += 1
                if log:
                    log(f"[{time.monotonic() - t_start:6.1f}s] no healthy replica to kill; skipped")
            next_kill += kill_every_s

    async def soak() -> None:
        ctx = zmq.asyncio.Context()
        crew = [Robot(i, ctx, next_request, judge) for i in range(robots)]
        t_start = time.monotonic()
        killer = (asyncio.ensure_future(asyncio.to_thread(kill_now_and_then, t_start, t_start + duration_s))
                  if kill_every_s is not None else None)
        try:
            # the last requests get their full timeout; one cut off even then is lost
            await run_robots(crew, time.perf_counter() + duration_s, drain_s=timeout_s + 10.0)
            tally.lost += sum(r.in_flight is not None for r in crew)
        finally:
            stop_kills.set()
            if killer is not None:
                await killer
            report.elapsed_s = round(time.monotonic() - t_start, 2)
            ctx.destroy(linger=0)

    asyncio.run(soak())
    for name in ("sent_good", "sent_hostile", "answered", "actions", "hostile_errors", "hostile_mismatch", "lost",
                 "garbled"):
        setattr(report, name, getattr(tally, name))
    for kind, msgs in tally.examples.items():
        report.examples[kind] = msgs[:MAX_EXAMPLES]
    report.sent = report.sent_good + report.sent_hostile
    report.good_errors = dict(tally.good_errors)
    report.errors_by_kind = dict(tally.errors_by_kind)
    report.hostile_by_category = dict(sorted(tally.hostile_by_category.items()))
    report.replicas_seen = sorted(tally.replicas)
    report.latency_ms = summarize(tally.latencies)
    report.throughput_rps = round(report.answered / max(report.elapsed_s, 1e-9), 2)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, help="host:port (repeatable); host:port/tag routes by tag")
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--hostile-rate", type=float, default=0.1, help="fraction of hostile messages (0-1)")
    parser.add_argument("--kill-replicas-every", type=float, default=None, metavar="S",
                        help="kill one policy replica of --app every S seconds (needs ray)")
    parser.add_argument("--app", default=None, help="the Serve application whose replicas are killed")
    parser.add_argument("--spare", action="append", default=None,
                        help=f"deployment never killed (repeatable; default {INGRESS_DEPLOYMENT})")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join in kill mode (default: auto)")
    parser.add_argument("--timeout-ms", type=int, default=DEFAULT_TIMEOUT_MS, help="a request without reply after this is lost")
    parser.add_argument("--api-token", default=None)
    parser.add_argument("--batch", type=int, default=1, help="B of the good observations")
    parser.add_argument("--image-size", default=None, help="HxW of the good observations (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    args = parser.parse_args(argv)
    image_size = None
    if args.image_size:
        h, _, w = args.image_size.lower().partition("x")
        image_size = (int(h), int(w))
    try:
        report = run_soak(
            args.target, args.robots, args.duration, hostile_rate=args.hostile_rate,
            kill_every_s=args.kill_replicas_every, app=args.app, spare=tuple(args.spare or (INGRESS_DEPLOYMENT,)),
            ray_address=args.ray_address, timeout_ms=args.timeout_ms, api_token=args.api_token, batch=args.batch,
            image_size=image_size, seed=args.seed, log=lambda m: print(m, flush=True),
        )
    except (ValueError, OSError, RuntimeError) as exc:  # bad arguments, no server (timeout), info refused
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
