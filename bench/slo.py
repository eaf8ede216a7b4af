"""SLO benchmark: on-time goodput and deadline attainment of robots at a control rate, under overload.

A robot needs its next action chunk before the current one runs out. Here each robot ticks at `--hz`, keeps
one request outstanding (a GR00T REQ robot), and carries a deadline (`options.deadline_ms`): a share of the
robots (`--tight-share`, 0.1) a tight one, the others a loose one. An action that arrives after its
deadline is worth nothing. Compared, on the same model and machine, one after the other:

- `edf`: fleetserve as `make serve` starts it (serve_config.yaml, the EDF scheduler);
- `fifo`: the same with `ingress.scheduler: fifo` (the previous scheduler);
- `serial`: bench/serial_server.py, upstream's one-request-at-a-time shape (it knows no deadlines: the
  robot judges them).

First the closed-loop capacity C of the app (16 robots, as fast as answered, samples/s); then fleets of
`level x C / hz` robots for each overload level (1x = the fleet asks exactly C). Per point: goodput (actions
on time per second), attainment per class (on time / sent), refusals, expirations, actions delivered late,
and the worst reply time past a deadline. Output: a table, the largest fleet served at >= 99% attainment per
server, PASS/MISS of the targets, bench/results/slo-<stamp>.json (+ slo-latest.json) and
slo-<stamp>-<preset>.png (attainment and goodput against robots).

    python -m bench.slo                  # the measurement (small preset; ~25 min on a 2-core machine)
    python -m bench.slo --quick          # smoke run: tiny preset, levels 1x and 4x, short windows
    python -m bench.slo --robots 64      # one fleet of 64 robots instead of the levels' fleets
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import zmq.asyncio

from bench.harness import (RESULTS, bench_serve_config, ensure_checkpoint, log, results_header, settle_replicas,
                           start_app, status_page, write_results)
from bench.report import pyplot
from bench.robots import ACTION, Outcome, Request, Robot, build_payloads, embodiment_of, fetch_info, parse_target, run_robots
from bench.serial_server import SerialServerProcess
from bench.stats import median, percentile
from clients.protocol import Refusal

# Per preset: control rate and the two deadline classes, in proportion to the forward pass. small's is ~0.5 s
# alone and ~6.5 s at 16 samples on one CPU thread (the GR00T N1.6 architecture at small width), so its
# deadlines are seconds: the tight one ~6 passes alone, the loose one ~16; tiny's are tens of ms.
PRESETS = {
    "small": {"hz": 0.5, "tight_ms": 3000.0, "loose_ms": 8000.0},
    "tiny": {"hz": 20.0, "tight_ms": 60.0, "loose_ms": 250.0},
}
CAPACITY_ROBOTS = 16
EXPIRED = (Refusal.EXPIRED_WAITING.value, Refusal.EXPIRED_ON_REPLICA.value)
ATTAINMENT_GOAL = 0.99


@dataclass
class ClassStats:
    sent: int = 0
    on_time: int = 0
    late: int = 0  # an action that came after its deadline
    refused: int = 0  # reason refused_early
    expired: int = 0  # reason expired_waiting or expired_on_replica
    other_errors: int = 0
    no_answer: int = 0  # nothing within deadline + answer_grace_s
    worst_past_deadline_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # info["server"] of the actions delivered on time
    infer_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)

    def record(self, outcome: Outcome, deadline_s: float) -> None:
        """Judge one request against its deadline: on time, late, refused, expired, or unanswered."""
        self.sent += 1
        if outcome.status == "timeout":  # waited deadline + grace: the robot gave up on it
            self.no_answer += 1
            self.worst_past_deadline_s = max(self.worst_past_deadline_s, outcome.request.timeout_s - deadline_s)
            return
        past = outcome.done_at - outcome.sent_at - deadline_s
        self.worst_past_deadline_s = max(self.worst_past_deadline_s, past)
        if outcome.status != ACTION:
            if outcome.reason == Refusal.REFUSED_EARLY.value:
                self.refused += 1
            elif outcome.reason in EXPIRED:
                self.expired += 1
            else:
                self.other_errors += 1
        elif past <= 0:
            self.on_time += 1
            self.latencies_ms.append(outcome.latency_ms)
            server = outcome.server
            if server:
                self.batch_sizes.append(server.get("batch_size", 0))
                self.infer_ms.append(server.get("infer_ms", 0.0))
                self.queue_ms.append(server.get("queue_ms", 0.0))
        else:
            self.late += 1

    def summary(self, window_s: float) -> dict[str, Any]:
        return {
            "sent": self.sent, "on_time": self.on_time, "late": self.late, "refused": self.refused,
            "expired": self.expired, "other_errors": self.other_errors, "no_answer": self.no_answer,
            "attainment": self.on_time / self.sent if self.sent else None,
            "goodput": self.on_time / window_s,
            "worst_past_deadline_s": round(self.worst_past_deadline_s, 3),
            "p50_ms": percentile(self.latencies_ms, 50),
            "p99_ms": percentile(self.latencies_ms, 99),
            "median_batch_size": median(self.batch_sizes),
            "median_infer_ms": median(self.infer_ms),
            "median_queue_ms": median(self.queue_ms),
        }


async def _drive(address: str, payloads: dict[str, bytes], robots: int, hz: float | None, deadlines: dict[str, float],
                 warmup_s: float, window_s: float, answer_grace_s: float, tight_share: float) -> dict[str, ClassStats]:
    """Robots tick at `hz` (None: as fast as answered), one request outstanding each; a request waits at most its
    deadline + `answer_grace_s`; those sent inside the window are judged, per class."""
    ctx = zmq.asyncio.Context()
    stats = {cls: ClassStats() for cls in deadlines}
    every = max(1, round(1.0 / tight_share)) if tight_share > 0 else 0

    def cls_of(i: int) -> str:  # robot 0, every-th after it, is tight (one class only: that one)
        if len(deadlines) == 1:
            return next(iter(deadlines))
        return "tight" if every and i % every == 0 else "loose"

    def next_request(robot: Robot) -> Request:
        cls = cls_of(robot.index)
        return Request(address, payloads[cls], deadlines[cls] / 1000.0 + answer_grace_s, cls)

    start = time.perf_counter() + warmup_s

    def judge(outcome: Outcome) -> None:
        if outcome.sent_at >= start:
            cls = outcome.request.label
            stats[cls].record(outcome, deadlines[cls] / 1000.0)

    phases = np.random.default_rng(robots).random(robots)
    crew = [Robot(i, ctx, next_request, judge, rate_hz=hz, phase=float(phases[i])) for i in range(robots)]
    try:
        await run_robots(crew, start + window_s, drain_s=max(deadlines.values()) / 1000.0 + answer_grace_s)
    finally:
        ctx.destroy(linger=0)
    return stats


def drive(address: str, payloads: dict[str, bytes], robots: int, hz: float | None, deadlines: dict[str, float],
          warmup_s: float, window_s: float, answer_grace_s: float = 1.0, tight_share: float = 0.5) -> dict[str, Any]:
    stats = asyncio.run(_drive(address, payloads, robots, hz, deadlines, warmup_s, window_s, answer_grace_s,
                               tight_share))
    per_class = {cls: s.summary(window_s) for cls, s in stats.items()}
    total = ClassStats()
    for s in stats.values():
        for k in ("sent", "on_time", "late", "refused", "expired", "other_errors", "no_answer"):
            setattr(total, k, getattr(total, k) + getattr(s, k))
        total.worst_past_deadline_s = max(total.worst_past_deadline_s, s.worst_past_deadline_s)
        total.latencies_ms += s.latencies_ms
        total.batch_sizes += s.batch_sizes
        total.infer_ms += s.infer_ms
        total.queue_ms += s.queue_ms
    return {"robots": robots, "hz": hz, "window_s": window_s, "all": total.summary(window_s), "classes": per_class}


def _payloads(target: str, deadlines: dict[str, float], send_deadline: bool, image_size) -> dict[str, bytes]:
    """One encoded observation per deadline class (the serial server knows no deadlines: none is sent to it)."""
    t = parse_target(target)
    emb = embodiment_of(fetch_info(t, timeout_ms=60_000), t)
    return {cls: build_payloads(t, emb, 1, image_size, 1, seed=0,
                                options={"deadline_ms": ms} if send_deadline else None)[0]
            for cls, ms in deadlines.items()}


def run_server(label: str, target: str, args, deadlines: dict[str, float], robot_counts: list[int] | None,
               image_size, status_url: str | None = None, settle=None) -> dict[str, Any]:
    """Capacity (closed loop) then the overload sweep against one server; robot counts from the first server.
    `settle(robots)`: under autoscaling, drive that load until the replica count stops changing first, so the
    capacity is that of the replicas the load gets, not of the scale-up."""
    settled = settle(CAPACITY_ROBOTS) if settle else None
    payloads = _payloads(target, deadlines, send_deadline=label != "serial", image_size=image_size)
    address = f"tcp://{target}"
    # Closed-loop capacity: every robot as fast as answered, deadlines out of the way.
    cap_payloads = _payloads(target, {"all": 60_000.0}, send_deadline=label != "serial", image_size=image_size)
    cap = drive(address, cap_payloads, CAPACITY_ROBOTS, None, {"all": 60_000.0}, args.warmup, args.duration)
    capacity = cap["all"]["sent"] / args.duration
    log(f"  {label}: closed-loop capacity {capacity:.2f} samples/s ({CAPACITY_ROBOTS} robots)")
    if robot_counts is None:
        robot_counts = sorted({max(1, round(level * capacity / args.hz)) for level in args.levels})
    points = []
    for n in robot_counts:
        p = drive(address, payloads, n, args.hz, deadlines, args.warmup, args.duration, tight_share=args.tight_share)
        p["offered_samples_per_s"] = n * args.hz
        p["server_status"] = (status_page(status_url) or {}).get("embodiments") if status_url else None
        a = p["all"]
        log(f"  {label} {n:4d} robots ({n * args.hz / capacity:.1f}x): goodput {a['goodput']:.2f}/s, attainment "
            + ", ".join(f"{c} {s['attainment'] if s['attainment'] is None else round(s['attainment'], 3)}"
                        for c, s in p["classes"].items())
            + f", refused {a['refused']}, expired {a['expired']}, late {a['late']}, no answer {a['no_answer']}, "
              f"worst past deadline {a['worst_past_deadline_s']:.2f} s; on-time batches median "
              f"{a['median_batch_size']} samples, forward {a['median_infer_ms']} ms")
        points.append(p)
    served_at_goal = [p["robots"] for p in points if (p["all"]["attainment"] or 0) >= ATTAINMENT_GOAL]
    return {"label": label, "capacity_samples_per_s": capacity, "capacity_point": cap, "robot_counts": robot_counts,
            "settle": settled, "points": points, "largest_fleet_at_99": max(served_at_goal) if served_at_goal else 0}


def check_targets(edf: dict[str, Any], capacity: float, hz: float) -> list[dict[str, Any]]:
    top = max(edf["points"], key=lambda p: p["robots"])
    level = top["robots"] * hz / capacity
    a = top["all"]
    tight = top["classes"]["tight"]["attainment"] or 0.0
    worst = max(p["all"]["worst_past_deadline_s"] for p in edf["points"])
    late = sum(p["all"]["late"] for p in edf["points"])
    no_answer = sum(p["all"]["no_answer"] for p in edf["points"])
    rows = [
        (f"goodput at {level:.1f}x overload >= 80% of closed-loop capacity", a["goodput"] / capacity, 0.8,
         f"{a['goodput']:.2f}/s of {capacity:.2f}/s = {a['goodput'] / capacity:.0%}"),
        ("no action delivered after its deadline (all points)", -late, 0, f"{late} late"),
        ("every request answered within deadline + 1 s (all points)", -max(worst - 1.0, 0) - no_answer, 0,
         f"worst {worst:.2f} s past a deadline, {no_answer} unanswered"),
        (f"tight class >= 95% attainment at {level:.1f}x", tight, 0.95, f"{tight:.1%}"),
    ]
    return [{"target": t, "value": v, "goal": g, "shown": shown, "pass": v >= g} for t, v, g, shown in rows]


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        plt = pyplot()
    except RuntimeError:  # no matplotlib: the figures are in the JSON and the table
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, server in results["servers"].items():
        xs = [p["robots"] for p in server["points"]]
        for cls, style in (("tight", "-"), ("loose", "--")):
            ax1.plot(xs, [(p["classes"][cls]["attainment"] or 0) * 100 for p in server["points"]], style, marker="o",
                     label=f"{label} {cls}")
        ax2.plot(xs, [p["all"]["goodput"] for p in server["points"]], marker="o", label=label)
    ax1.axhline(ATTAINMENT_GOAL * 100, color="grey", lw=0.8)
    ax1.set(xlabel="robots", ylabel="attainment (% on time)", title="SLO attainment")
    cap = results["capacity_samples_per_s"]
    ax2.axhline(cap, color="grey", lw=0.8, label="closed-loop capacity (edf)")
    ax2.set(xlabel="robots", ylabel="actions on time / s", title="on-time goodput")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{results['preset']}: robots at {results['hz']} Hz, deadlines {results['deadlines_ms']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.slo", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model size (default small; tiny with --quick)")
    p.add_argument("--levels", default=None, help="overload levels, x closed-loop capacity (default 0.5,1,2,4)")
    p.add_argument("--hz", type=float, default=None, help="robots' control rate")
    p.add_argument("--tight-ms", type=float, default=None)
    p.add_argument("--loose-ms", type=float, default=None)
    p.add_argument("--tight-share", type=float, default=0.1,
                   help="share of the robots in the tight class (default 0.1: at 4x overload the tight robots alone "
                        "ask ~0.4x capacity, which the loose ones make room for; at 0.2 they would ask 0.8x or more, "
                        "at the short batches their deadline allows: more than any scheduler can keep at 95%%)")
    p.add_argument("--robots", default=None, metavar="N[,M...]",
                   help="fleet sizes to measure instead of those the --levels give (e.g. 64: 64 robots at --hz, "
                        "whatever overload that is); the closed-loop capacity is still measured first")
    p.add_argument("--duration", type=float, default=None, help="measured window per point, s (default 30)")
    p.add_argument("--warmup", type=float, default=None, help="s before each window (default 8)")
    p.add_argument("--servers", default="edf,fifo,serial", help="which of edf, fifo, serial")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, levels 1,4, 6 s windows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "small")
    defaults = PRESETS[preset]
    args.hz = args.hz or defaults["hz"]
    args.levels = [float(x) for x in (args.levels or ("1,4" if args.quick else "0.5,1,2,4")).split(",")]
    args.duration = args.duration or (6.0 if args.quick else 30.0)
    args.warmup = args.warmup or (3.0 if args.quick else 8.0)
    deadlines = {"tight": args.tight_ms or defaults["tight_ms"], "loose": args.loose_ms or defaults["loose_ms"]}
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    checkpoint = ensure_checkpoint(preset)
    image_size = None
    RESULTS.mkdir(parents=True, exist_ok=True)  # the servers' logs go there before the results do
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log(f"SLO bench: {preset}, robots at {args.hz} Hz, deadlines {deadlines} ms, levels {args.levels}x capacity, "
        f"windows {args.duration:.0f} s, servers {servers}")
    results: dict[str, Any] = {**results_header("bench.slo", argv, args.device), "preset": preset, "hz": args.hz,
                               "deadlines_ms": deadlines, "levels": args.levels, "tight_share": args.tight_share,
                               "servers": {}}
    # --robots: the same fleets for every server; otherwise sized on the first server's capacity
    robot_counts = [int(x) for x in args.robots.split(",")] if args.robots else None
    plan = SimpleNamespace(keep_deadline=True, timeout_ms=180_000, device=args.device, torch_threads=None, gpu=False,
                           embodiment="gr1", replicas=None, settle_max_s=90.0)
    for label in servers:
        if label in ("edf", "fifo"):
            config = bench_serve_config(checkpoint, plan)
            app = config["applications"][0]
            app["name"] = f"slo-{label}"
            app["route_prefix"] = f"/slo-{label}"
            app["args"]["ingress"]["scheduler"] = label
            port = next(p["port"] for p in app["args"]["ingress"]["ports"] if p["embodiment"] == "gr1")
            runner = start_app(config, port, RESULTS / f"slo-config-{stamp}-{label}.yaml",
                               RESULTS / f"slo-serve-{stamp}-{label}.log")
            status_url = f"http://127.0.0.1:{config['http_options']['port']}{app['route_prefix']}"
            try:
                results["servers"][label] = run_server(
                    label, f"127.0.0.1:{port}", args, deadlines, robot_counts, image_size, status_url,
                    settle=lambda robots: settle_replicas(plan, [f"127.0.0.1:{port}"], robots, app["name"]))
            finally:
                runner.stop()
        elif label == "serial":
            with SerialServerProcess(str(checkpoint), "gr1", device=args.device,
                                     log_path=str(RESULTS / f"slo-serial-{stamp}.log")) as server:
                results["servers"][label] = run_server(label, f"127.0.0.1:{server.port}", args, deadlines, robot_counts,
                                                       image_size)
        else:
            raise SystemExit(f"--servers: expected edf, fifo or serial, got {label!r}")
        if robot_counts is None:  # every server gets the same fleets, sized on the first one's capacity
            robot_counts = results["servers"][label]["robot_counts"]
        results.setdefault("capacity_samples_per_s", results["servers"][label]["capacity_samples_per_s"])

    print(f"\nSLO results ({preset}, {args.hz} Hz, tight {deadlines['tight']:.0f} ms / loose {deadlines['loose']:.0f} ms)")
    print(f"{'server':>7} {'robots':>6} {'offered':>8} {'goodput':>8} {'tight':>7} {'loose':>7} {'refused':>7} "
          f"{'expired':>7} {'late':>5} {'worst+':>7}")
    for label, server in results["servers"].items():
        for p in server["points"]:
            a = p["all"]
            print(f"{label:>7} {p['robots']:6d} {p['offered_samples_per_s']:8.1f} {a['goodput']:8.2f} "
                  f"{(p['classes']['tight']['attainment'] or 0):7.1%} {(p['classes']['loose']['attainment'] or 0):7.1%} "
                  f"{a['refused']:7d} {a['expired']:7d} {a['late']:5d} {a['worst_past_deadline_s']:7.2f}")
        print(f"{label:>7} closed-loop capacity {server['capacity_samples_per_s']:.2f}/s; largest fleet at >= 99% "
              f"attainment: {server['largest_fleet_at_99']} robots")
    if "edf" in results["servers"]:
        targets = check_targets(results["servers"]["edf"], results["servers"]["edf"]["capacity_samples_per_s"], args.hz)
        results["targets"] = targets
        print("\nDone-when targets (edf):")
        for t in targets:
            print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['shown']}")
    out = write_results("slo", stamp, results)
    png = plot(results, RESULTS / f"slo-{stamp}-{preset}.png")
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
