"""`python -m bench.loop`: the fleet's control loop, end to end: robots executing action chunks at 30 Hz against
the served model (real forward times), three ways of getting the next chunk:

  sync    run a chunk to its end, ask, stand still until the answer comes (upstream's example loop)
  async   ask before the chunk ends (when the buffer falls to the predicted delay), switch when the answer comes
          at the step it is aligned to (naive asynchronous execution)
  rtc     async, and the request carries real-time chunking: the steps not executed yet, the ones that will
          run before the answer comes frozen (clients.ChunkExecutor)

Every robot is a clients.ChunkExecutor with its own PolicyClient, closed loop: its state is the last action it
executed. Per mode, fleet size and preset it reports
  idle         ticks with no action to run (buffer underruns), per robot per second
  jump         the action step across a chunk switch over the p95 step inside chunks (median over switches):
               ~1 means switching is as smooth as executing; >> 1 the arm jumps
  jerk         third differences within 2 steps after a switch over those elsewhere (median)
  staleness    the age of the observation behind each executed action (median, ms)
and writes bench/results/loop-<stamp>.json and a plot.

    python -m bench.loop                                  # tiny-smooth and small-smooth, 1 / 8 / 32 robots, all modes
    python -m bench.loop --presets tiny-smooth --robots 8 --duration 10

The default presets are the smooth demo presets (policy.demo_training: a briefly trained head, chunks that move
smoothly): random-weight presets (tiny, small) jump at every step, so "jump" cannot show a continued chunk.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from bench.stats import median, percentile

MODES = ("sync", "async", "rtc")


# ---------------------------------------------------------------------------------------------------------
# metrics of one robot's executed actions


def _flat(step: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(step[k]) for k in sorted(step)])


def smoothness(executed: list[dict[str, np.ndarray]], switches: Sequence[int]) -> dict[str, list[float]]:
    """Per switch: |a[s] - a[s-1]|_max over the p95 of the same inside chunks, and the mean |third difference|
    of the 3 steps from a switch over the median elsewhere. Idle gaps are not steps: `executed` lists the
    actions in order."""
    if len(executed) < 5:
        return {"jump": [], "jerk": []}
    a = np.stack([_flat(s) for s in executed])
    step = np.abs(np.diff(a, axis=0)).max(axis=1)  # step[t-1]: a[t-1] -> a[t]
    third = np.abs(a[3:] - 3 * a[2:-1] + 3 * a[1:-2] - a[:-3]).max(axis=1)  # third[t-3]: ending at a[t]
    boundary = {s for s in switches if 0 < s < len(a)}
    inside = [step[t - 1] for t in range(1, len(a)) if t not in boundary]
    near = {t for s in boundary for t in range(s, s + 3)}
    calm = [third[t - 3] for t in range(3, len(a)) if t not in near]
    if not inside or not calm:
        return {"jump": [], "jerk": []}
    p95, quiet = float(np.percentile(inside, 95)), float(np.median(calm))
    jumps = [float(step[s - 1]) / p95 for s in sorted(boundary)] if p95 > 0 else []
    jerks = [float(np.mean([third[t - 3] for t in range(s, s + 3) if 3 <= t < len(a)])) / quiet
             for s in sorted(boundary) if s + 2 < len(a) and s >= 3] if quiet > 0 else []
    return {"jump": jumps, "jerk": jerks}


# ---------------------------------------------------------------------------------------------------------
# robots


class _Robot:
    """A closed-loop robot: random cameras, a state that is the last executed action (where keys match)."""

    def __init__(self, embodiment: dict[str, Any], seed: int):
        from clients.observations import random_observation

        self.obs = random_observation(embodiment, 1, rng=np.random.default_rng(seed))
        self._lock = threading.Lock()

    def observe(self) -> dict[str, Any]:
        with self._lock:
            return {m: dict(v) for m, v in self.obs.items()}

    def act(self, step: dict[str, np.ndarray]) -> None:
        with self._lock:
            for key, value in step.items():
                if key in self.obs["state"]:
                    self.obs["state"][key] = np.asarray(value, np.float32).reshape(1, 1, -1).copy()


def run_point(address: tuple[str, int], embodiment: dict[str, Any], mode: str, robots: int, hz: float,
              duration_s: float, warmup_s: float, ramp_rate: float | None = None) -> dict[str, Any]:
    from clients import ChunkExecutor, PolicyClient

    executors, clients_, threads = [], [], []
    for i in range(robots):
        robot = _Robot(embodiment, seed=i)
        client = PolicyClient(address[0], address[1], timeout_ms=30_000)
        clients_.append(client)
        # Only the RTC robots name themselves: a named robot gets the ingress's robot session, which turns its
        # request into RTC from the chunk it was last sent (serving.robot_sessions) -- naive async would not be
        # naive any more.
        ex = ChunkExecutor(client, robot.observe, robot.act, control_hz=hz, mode="sync" if mode == "sync" else "async",
                           rtc=mode == "rtc", robot_id=f"loop-{i}" if mode == "rtc" else None,
                           record=True, **({} if ramp_rate is None else {"rtc_ramp_rate": ramp_rate}))
        executors.append(ex)
    # warm-up: every robot runs (and fills its round-trip history); then the stats start from zero
    for ex in executors:
        threads.append(threading.Thread(target=ex.run, args=(warmup_s + duration_s,), daemon=True))
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    for ex in executors:
        ex.reset_stats()
    for t in threads:
        t.join(duration_s + 60)
    jumps, jerks, idle, staleness, rt, failures = [], [], [], [], [], {}
    for ex in executors:
        s = ex.stats
        for label, n in s.failure_kinds.items():
            failures[label] = failures.get(label, 0) + n
        sm = smoothness(s.executed, s.switches)
        jumps += sm["jump"]
        jerks += sm["jerk"]
        idle.append(s.idle_ticks / duration_s)
        staleness += s.staleness_ms
        rt += s.round_trip_ms
        ex.close()
    for c in clients_:
        c.close()
    return {
        "mode": mode, "robots": robots, "hz": hz, "duration_s": duration_s,
        "idle_ticks_per_robot_s": round(float(np.mean(idle)), 3),
        "robots_idle": int(sum(1 for x in idle if x > 0)),
        "jump_over_p95_step": median(jumps), "jump_p90": percentile(jumps, 90),
        "jerk_near_switch_over_elsewhere": median(jerks),
        "staleness_ms_p50": median(staleness), "round_trip_ms_p50": median(rt),
        "chunks": int(sum(ex.stats.chunks for ex in executors)),
        "failures": failures,  # requests that got no chunk, by the error's kind (reason)
    }


# ---------------------------------------------------------------------------------------------------------
# the served app


def serve(preset: str, results: Path, stamp: str):
    from bench.harness import ServeRun, bench_serve_config, ensure_checkpoint
    from bench.robots import fetch_info

    plan = SimpleNamespace(keep_deadline=False, timeout_ms=30_000, device="cpu", torch_threads=None, gpu=False,
                           embodiment="gr1", replicas=None)
    config = bench_serve_config(ensure_checkpoint(preset), plan)
    app = config["applications"][0]
    port = next(p["port"] for p in app["args"]["ingress"]["ports"] if p["embodiment"] == "gr1")
    runner = ServeRun(config, results / f"loop-config-{stamp}-{preset}.yaml", results / f"loop-serve-{stamp}-{preset}.log")
    runner.wait_ready(f"127.0.0.1:{port}")
    info = fetch_info(f"127.0.0.1:{port}")
    return runner, ("127.0.0.1", port), info["embodiments"]["gr1"]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'preset':12s} {'robots':>6s} {'mode':6s} {'idle/rb/s':>9s} {'idle rb':>7s} {'jump':>6s} {'jump90':>7s} "
          f"{'jerk':>6s} {'stale ms':>9s} {'rtt ms':>8s}")
    for r in rows:
        def f(v):
            return "-" if v is None else f"{v:g}"
        print(f"{r['preset']:12s} {r['robots']:6d} {r['mode']:6s} {f(r['idle_ticks_per_robot_s']):>9s} "
              f"{r['robots_idle']:7d} {f(r['jump_over_p95_step']):>6s} {f(r['jump_p90']):>7s} "
              f"{f(r['jerk_near_switch_over_elsewhere']):>6s} {f(r['staleness_ms_p50']):>9s} {f(r['round_trip_ms_p50']):>8s}")


def plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    presets = sorted({r["preset"] for r in rows})
    fig, axes = plt.subplots(2, len(presets), figsize=(5 * len(presets), 7), squeeze=False)
    for col, preset in enumerate(presets):
        for mode in MODES:
            pts = sorted((r["robots"], r) for r in rows if r["preset"] == preset and r["mode"] == mode)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1]["idle_ticks_per_robot_s"] for p in pts], marker="o", label=mode)
            axes[1][col].plot(xs, [p[1]["jump_over_p95_step"] or 0 for p in pts], marker="o", label=mode)
        axes[0][col].set_title(f"{preset}: idle ticks / robot / s")
        axes[1][col].set_title(f"{preset}: chunk-switch step / p95 step")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("robots")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny-smooth,small-smooth",
                        help="demo presets, comma-separated (random-weight ones have no smooth chunks to compare)")
    parser.add_argument("--robots", default="1,8,32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--hz", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--ramp-rate", type=float, default=None,
                        help="RTC robots' ramp_rate (default: the executor's)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict[str, Any]] = []
    for preset in args.presets.split(","):
        runner, address, embodiment = serve(preset, results, stamp)
        try:
            for robots in [int(x) for x in args.robots.split(",")]:
                for mode in args.modes.split(","):
                    row = run_point(address, embodiment, mode, robots, args.hz, args.duration, args.warmup, args.ramp_rate)
                    row["preset"] = preset
                    rows.append(row)
                    print_table([row])
        finally:
            runner.stop()
    print()
    print_table(rows)
    out = results / f"loop-{stamp}.json"
    from bench.harness import results_header

    header = results_header("bench.loop", argv, "cpu")  # the command, the machine and the commit beside the figures
    out.write_text(json.dumps({**header, "args": vars(args), "rows": rows}, indent=1, default=str))
    png = plot(rows, results / f"loop-{stamp}.png")
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
