"""`python -m bench.hostile`: hostile traffic at a served app; every message must get an error naming its fault.

Robots send messages from the hostile corpus (tests/support/hostile_corpus.py: random bytes, truncated
msgpack, wrong types, huge shapes, pickled .npy, bad tags, ...) round-robin over its categories, so each
category is covered, and judge each reply with the corpus's own check: an `{"error": ...}` reply whose kind
and message name the fault. Good robots can run alongside (`--good-robots`): they must keep getting actions.

    python -m bench.hostile --serve tiny --duration 10            # starts the app as `make serve` does
    python -m bench.hostile --target 127.0.0.1:5555 --robots 8 --good-robots 2 --duration 30

Prints a table per category (sent, fitting errors, mismatches, lost) and the good robots' outcomes, writes
bench/results/hostile-<stamp>.json (+ hostile-latest.json); exit status 1 when any message got no reply,
a reply that did not fit, or a good robot got anything but an action. For minutes of mixed traffic with
replicas killed meanwhile, see `python -m bench.soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any, Sequence

import zmq.asyncio

from bench.harness import RESULTS, bench_serve_config, ensure_checkpoint, log, results_header, start_app, write_results
from bench.robots import (ACTION, TIMEOUT, Outcome, Request, Robot, Target, build_payloads, embodiment_of, fetch_info,
                          parse_target, run_robots)
from bench.stats import summarize
from tests.support.hostile_corpus import CATEGORIES, HostileGenerator

TIMEOUT_S = 20.0  # above the ingress's request_timeout_ms (12 s): a slow error is still an answer, none is lost


def attack(target: Target, robots: int, good_robots: int, duration_s: float, categories: list[str],
           seed: int = 0) -> dict[str, Any]:
    """Run the hostile (and good) robots against `target` for `duration_s`; per-category and good-robot counts."""
    info = fetch_info(target, timeout_ms=60_000)
    embodiment = embodiment_of(info, target)
    limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
    generators = [HostileGenerator(embodiment, seed=seed * 1_000_003 + i, served_tags=sorted(info["embodiments"]),
                                   tag=target.embodiment_tag, categories=categories,
                                   max_batch_per_request=int(limits.get("max_batch_per_request") or 64))
                  for i in range(robots)]
    turns = [itertools.cycle(categories[i % len(categories):] + categories[:i % len(categories)]) for i in range(robots)]
    good = build_payloads(target, embodiment, 1, None, 4, seed)
    per_category = {c: Counter() for c in categories}
    good_outcomes: Counter[str] = Counter()
    good_latencies: list[float] = []
    examples: list[str] = []

    def next_request(robot: Robot) -> Request:
        if robot.index >= robots:  # a good robot
            return Request(target.address, good[robot.sent % len(good)], TIMEOUT_S)
        hostile = generators[robot.index].make(next(turns[robot.index]))
        return Request(target.address, hostile.payload, TIMEOUT_S, hostile)

    def judge(outcome: Outcome) -> None:
        hostile = outcome.request.label
        if hostile is None:
            good_outcomes[outcome.label] += 1
            if outcome.status == ACTION:
                good_latencies.append(outcome.latency_ms)
            return
        counts = per_category[hostile.category]
        counts["sent"] += 1
        if outcome.status == TIMEOUT:
            counts["lost"] += 1
            why = "no reply"
        elif outcome.reply is None:
            counts["mismatch"] += 1
            why = outcome.label
        else:
            why = hostile.check(outcome.reply)
            counts["fitting" if why is None else "mismatch"] += 1
        if why is not None and len(examples) < 10:
            examples.append(f"{hostile.category}: {why}"[:300])

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        try:
            crew = [Robot(i, ctx, next_request, judge) for i in range(robots + good_robots)]
            await run_robots(crew, time.perf_counter() + duration_s, drain_s=TIMEOUT_S)
        finally:
            ctx.destroy(linger=0)

    asyncio.run(run())
    bad = sum(c["lost"] + c["mismatch"] for c in per_category.values())
    bad += sum(n for label, n in good_outcomes.items() if label != ACTION)
    return {"target": target.label, "robots": robots, "good_robots": good_robots, "duration_s": duration_s,
            "categories": {c: dict(n) for c, n in per_category.items()}, "good": dict(good_outcomes),
            "good_latency_ms": summarize(good_latencies), "examples": examples, "ok": bad == 0}


def print_table(result: dict[str, Any]) -> None:
    print(f"\nhostile traffic -> {result['target']}: {result['robots']} hostile robots, {result['good_robots']} good, "
          f"{result['duration_s']:g} s")
    print(f"{'category':<24} {'sent':>6} {'fitting':>8} {'mismatch':>8} {'lost':>5}")
    for name, c in result["categories"].items():
        print(f"{name:<24} {c.get('sent', 0):6d} {c.get('fitting', 0):8d} {c.get('mismatch', 0):8d} {c.get('lost', 0):5d}")
    if result["good_robots"]:
        lat = result["good_latency_ms"]
        print(f"good robots: {result['good']}; latency ms p50 {lat['p50']} p99 {lat['p99']}")
    for line in result["examples"]:
        print(f"  e.g. {line}")
    print("OK" if result["ok"] else "FAILED")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="host:port[/tag] of a running server")
    where.add_argument("--serve", metavar="PRESET", help="start the app as `make serve` does, on this demo preset")
    p.add_argument("--robots", type=int, default=4, help="hostile robots (default 4)")
    p.add_argument("--good-robots", type=int, default=1, help="good robots alongside (default 1)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--categories", default=None,
                   help=f"comma-separated subset of the corpus's {len(CATEGORIES)} categories (default: all; "
                        "against the upstream-shaped serial server leave out `kill`: it obeys it)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    categories = args.categories.split(",") if args.categories else list(CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise SystemExit(f"--categories: unknown {unknown}; known: {sorted(CATEGORIES)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = results_header("bench.hostile", argv, "cpu")
    runner = None
    if args.serve:
        RESULTS.mkdir(parents=True, exist_ok=True)
        plan = SimpleNamespace(keep_deadline=True, timeout_ms=180_000, device="cpu", torch_threads=None, gpu=False,
                               embodiment="gr1", replicas=None, served_threads=False)
        config = bench_serve_config(ensure_checkpoint(args.serve), plan)
        app = config["applications"][0]
        app["name"] = "hostile"
        app["route_prefix"] = "/hostile"
        port = next(x["port"] for x in app["args"]["ingress"]["ports"] if x["embodiment"] == "gr1")
        log(f"starting the app ({args.serve}) on port {port}")
        runner = start_app(config, port, RESULTS / f"hostile-config-{stamp}.yaml", RESULTS / f"hostile-serve-{stamp}.log")
        target = Target("127.0.0.1", port)
    else:
        target = parse_target(args.target)
    try:
        results.update(attack(target, args.robots, args.good_robots, args.duration, categories, args.seed))
    finally:
        if runner is not None:
            runner.stop()
    print_table(results)
    print(f"wrote {write_results('hostile', stamp, results)}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
