"""Where one get_action's time goes: a per-hop breakdown from the timestamps the request carries.

Robots ask for the trace (`options={"trace": True}`); the ingress and the replica stamp each hop they pass
(epoch seconds, `time.time()`, one machine so one clock) and the reply carries them in
`info["server"]["trace"]`. The robot adds its own send and receive times. Reply encoding and the send happen
after the reply is built, so they cannot ride in it: the ingress times them for the traced replies and its
status page gives their medians (`reply_hops`).

    python -m bench.hops                          # tiny, 1 and 16 robots, the app as serve_config.yaml runs it
    python -m bench.hops --preset small --robots 1,16 --duration 30

Prints a table of each hop's median (and p90) per robot count, plus the serial reference server's p50 at
one robot measured in the same run, and writes bench/results/hops-<stamp>.json (+ hops-latest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import zmq.asyncio

from bench.harness import (RESULTS, ServeRun, bench_serve_config, ensure_checkpoint, log, results_header,
                           settle_replicas, status_page, write_results)
from bench.report import fmt
from bench.robots import ACTION, Outcome, Request, Robot, build_payloads, embodiment_of, fetch_info, parse_target, run_robots
from bench.serial_server import SerialServerProcess
from bench.stats import percentile

# (hop, what it covers, from stamp, to stamp); "send" and "robot" are the robot's own stamps.
HOPS: list[tuple[str, str, str, str]] = [
    ("zmq receive", "robot sends -> the ingress has the frames", "send", "recv"),
    ("decode", "msgpack, envelope and observation parsed", "recv", "decoded"),
    ("admission", "model, deadline, admitted into the queue", "decoded", "queued"),
    ("queue", "waits for its batch to be sent", "queued", "sent"),
    ("ray call out", "the batch's call -> the replica method runs", "sent", "replica_in"),
    ("replica queue", "replica method -> its @serve.batch handler runs", "replica_in", "batch_in"),
    ("@serve.batch", "batch handler -> the forward pass starts", "batch_in", "forward_start"),
    ("forward", "the policy's forward pass (infer_ms)", "forward_start", "forward_end"),
    ("replica return", "forward pass ends -> the replica method returns", "forward_end", "replica_out"),
    ("ray reply back", "the replica returns -> the ingress has the reply", "replica_out", "back"),
    ("reply build", "outcome -> the reply map", "back", "reply"),
]
ENCODE, SEND = "reply encode", "reply send"


def drive(address: str, payload: bytes, robots: int, warmup_s: float, window_s: float) -> tuple[list[dict], list[str]]:
    """`robots` closed-loop robots for warmup + window; the traced replies of the window (the server's stamps plus
    the robot's own, as epoch seconds: one machine, one clock) and every error by kind."""
    traces: list[dict] = []
    errors: list[str] = []

    async def measure() -> None:
        ctx = zmq.asyncio.Context()
        wall = time.time() - time.perf_counter()  # the server stamps epoch seconds; the robot perf_counter
        start = time.perf_counter() + warmup_s

        def keep(outcome: Outcome) -> None:
            if outcome.status != ACTION:
                errors.append(outcome.label)
                return
            trace = outcome.server.get("trace")
            if outcome.sent_at >= start and isinstance(trace, dict):
                traces.append({**trace, "send": outcome.sent_at + wall, "robot": outcome.done_at + wall,
                               "batch_size": outcome.server.get("batch_size")})

        crew = [Robot(i, ctx, lambda _robot: Request(address, payload, 60.0), keep) for i in range(robots)]
        try:
            await run_robots(crew, start + window_s, drain_s=60.0)
        finally:
            ctx.destroy(linger=0)

    asyncio.run(measure())
    return traces, errors


def breakdown(traces: list[dict], reply_hops: dict[str, Any] | None) -> dict[str, Any]:
    """Each hop's median and p90 (ms) over the traced replies; encode from the ingress's status page."""
    rows: dict[str, dict[str, Any]] = {}
    for name, what, a, b in HOPS:
        xs = [(t[b] - t[a]) * 1000.0 for t in traces if a in t and b in t]
        rows[name] = {"what": what, "p50_ms": percentile(xs, 50), "p90_ms": percentile(xs, 90), "n": len(xs)}
    encode = (reply_hops or {}).get("encode_ms_p50")
    send = [(t["robot"] - t["reply"]) * 1000.0 - (encode or 0.0) for t in traces if "reply" in t]
    rows[ENCODE] = {"what": "packb of the reply (ingress status page, p50)", "p50_ms": encode, "p90_ms": None,
                    "n": (reply_hops or {}).get("replies", 0)}
    rows[SEND] = {"what": "reply built and encoded -> the robot has it", "p50_ms": percentile(send, 50),
                  "p90_ms": percentile(send, 90), "n": len(send)}
    total = [(t["robot"] - t["send"]) * 1000.0 for t in traces]
    added = [(t["robot"] - t["send"] - (t["forward_end"] - t["forward_start"])) * 1000.0
             for t in traces if "forward_start" in t]
    threads = [t["forward_threads"] for t in traces if "forward_threads" in t]
    return {"hops": rows, "total_p50_ms": percentile(total, 50), "total_p90_ms": percentile(total, 90),
            "passes_on_threads": {str(n): threads.count(n) for n in sorted(set(threads))},
            "added_p50_ms": percentile(added, 50), "replies": len(traces),
            "mean_batch_size": (sum(t.get("batch_size") or 0 for t in traces) / len(traces)) if traces else None}


def serial_p50(checkpoint: Path, payload: bytes, warmup_s: float, window_s: float, threads: int | None) -> dict:
    """The serial reference at one robot, same payload (its reply has no trace: latency and infer_ms only)."""
    lat: list[float] = []
    infer: list[float] = []

    async def measure(address: str) -> None:
        ctx = zmq.asyncio.Context()
        start = time.perf_counter() + warmup_s

        def keep(outcome: Outcome) -> None:
            if outcome.sent_at >= start and outcome.status == ACTION:
                lat.append(outcome.latency_ms)
                infer.append(outcome.server["infer_ms"])

        try:
            await run_robots([Robot(0, ctx, lambda _robot: Request(address, payload, 60.0), keep)],
                             start + window_s, drain_s=60.0)
        finally:
            ctx.destroy(linger=0)

    with SerialServerProcess(str(checkpoint), "gr1", torch_threads=threads,
                             log_path=str(RESULTS / "hops-serial.log")) as server:
        asyncio.run(measure(f"tcp://127.0.0.1:{server.port}"))
    return {"torch_threads": threads, "p50_ms": percentile(lat, 50), "infer_p50_ms": percentile(infer, 50),
            "added_p50_ms": percentile([a - b for a, b in zip(lat, infer)], 50), "replies": len(lat)}


def print_table(result: dict[str, Any]) -> None:
    points = result["points"]
    head = f"{'hop':<16} " + " ".join(f"{str(p['robots']) + ' robot(s) p50':>16} {'p90':>7}" for p in points)
    print(f"\nPer-hop breakdown, {result['preset']} (ms; medians over the traced replies of each point)")
    print(head)
    for name in [h[0] for h in HOPS] + [ENCODE, SEND]:
        cells = []
        for p in points:
            row = p["hops"][name]
            cells.append(f"{fmt(row['p50_ms'], 2):>16} {fmt(row['p90_ms'], 2):>7}")
        print(f"{name:<16} " + " ".join(cells))
    print(f"{'total (robot)':<16} " + " ".join(f"{fmt(p['total_p50_ms'], 2):>16} {fmt(p['total_p90_ms'], 2):>7}" for p in points))
    print(f"{'added (- fwd)':<16} " + " ".join(f"{fmt(p['added_p50_ms'], 2):>16} {'':>7}" for p in points))
    print(f"{'mean batch':<16} " + " ".join(f"{fmt(p['mean_batch_size'], 2):>16} {'':>7}" for p in points))
    for p in points:
        if p.get("passes_on_threads"):
            print(f"  {p['robots']} robot(s): replies by the torch threads of their pass: {p['passes_on_threads']}")
    s = result.get("serial")
    if s:
        print(f"\nserial reference, 1 robot, {s['torch_threads'] or 'default'} torch thread(s): p50 {fmt(s['p50_ms'], 2)} ms, "
              f"infer_ms p50 {fmt(s['infer_p50_ms'], 2)}, added p50 {fmt(s['added_p50_ms'], 2)} ms")
        one = next((p for p in points if p["robots"] == 1), None)
        if one and one["total_p50_ms"] is not None and s["p50_ms"] is not None:
            print(f"served p50 - serial p50 at 1 robot: {one['total_p50_ms'] - s['p50_ms']:+.2f} ms "
                  f"(added around the forward pass: served {fmt(one['added_p50_ms'], 2)}, serial {fmt(s['added_p50_ms'], 2)})")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--robots", default="1,16")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--serial-threads", type=int, default=1,
                   help="torch threads of the serial reference (default 1, as bench.run's latency comparison)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads of the served replicas (default: as serve_config.yaml runs them, adaptive)")
    p.add_argument("--no-serial", action="store_true", help="skip the serial reference")
    a = p.parse_args(argv)
    robots = [int(x) for x in a.robots.split(",") if x.strip()]
    checkpoint = ensure_checkpoint(a.preset)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan = SimpleNamespace(keep_deadline=False, timeout_ms=180_000, device="cpu", torch_threads=a.torch_threads,
                           gpu=False, embodiment="gr1", replicas=None, settle_max_s=90.0,
                           served_threads=a.torch_threads is not None)
    config = bench_serve_config(checkpoint, plan)
    app = config["applications"][0]
    app["name"] = f"hops-{a.preset}"
    app["route_prefix"] = f"/{app['name']}"
    port = next(x["port"] for x in app["args"]["ingress"]["ports"] if x["embodiment"] == "gr1")
    target = f"127.0.0.1:{port}"
    status_url = f"http://127.0.0.1:{config['http_options']['port']}{app['route_prefix']}"
    result: dict[str, Any] = {**results_header("bench.hops", argv, "cpu"), "preset": a.preset, "points": []}
    runner = ServeRun(config, RESULTS / f"hops-config-{stamp}.yaml", RESULTS / f"hops-serve-{stamp}.log")
    try:
        runner.wait_ready(target)
        t = parse_target(target)
        emb = embodiment_of(fetch_info(t, timeout_ms=60_000), t)
        payload = build_payloads(t, emb, 1, None, 1, seed=0, options={"trace": True})[0]
        for n in robots:
            settled = settle_replicas(plan, [target], n, app["name"])
            before = (status_page(status_url) or {}).get("reply_hops")
            traces, errors = drive(f"tcp://{target}", payload, n, a.warmup, a.duration)
            hops = (status_page(status_url) or {}).get("reply_hops")
            point = {"robots": n, "settle": settled, "errors": errors[:20], "error_count": len(errors),
                     "loadavg_1m": round(os.getloadavg()[0], 2), "reply_hops_before": before,
                     **breakdown(traces, hops)}
            log(f"  {n} robot(s): {point['replies']} traced replies, total p50 {fmt(point['total_p50_ms'], 2)} ms, "
                f"added p50 {fmt(point['added_p50_ms'], 2)} ms, errors {len(errors)}")
            result["points"].append(point)
    finally:
        runner.stop()
    if not a.no_serial:
        # the same observation (seed 0) without the trace option: the serial server knows no options
        plain = build_payloads(t, emb, 1, None, 1, seed=0)[0]
        result["serial"] = serial_p50(checkpoint, plain, a.warmup, a.duration, a.serial_threads)
    print_table(result)
    out = write_results("hops", stamp, result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
