"""`make bench` / `python -m bench.run`: fleetserve against the upstream-shaped serial server and the limit.

In ONE run, on the same model and machine, for each preset and robot count:
  served    the Ray Serve application exactly as `make serve` starts it (`serve run` of serve_config.yaml, with
            the preset's checkpoint, device, torch_threads and free ports substituted), driven by bench.fleet;
            under autoscaling, each point first drives the load until the replica count settles;
  serial    the REFERENCE: bench/serial_server.py, one REP socket, one request at a time, the same policy
            in-process (what upstream GR00T's PolicyServer does), in its own process, driven the same way; on
            CPU measured twice: at the replicas' torch threads, and with all cores (upstream's default);
  limit     policy.get_actions on B observations in-process, no network (bench/limit.py): samples/s at
            B = 1, 4, 16, 64, in one process and in as many processes side by side as the driven deployment
            may have replicas; the ceiling of any server on this machine with that layout.
Then prints tables, ratios (served / serial at the same threads, served / the faster serial, served / the
limit of as many processes as replicas answered, at the mean batch size reached) and PASS/MISS against the
targets, and writes bench/results/bench-<timestamp>.json (+ latest.json) and plots.

    python -m bench.run                 # full CPU run (tiny and small, 1/4/16/64 robots), ~20 min on 2 cores
    python -m bench.run --quick         # smoke run, ~5 min (only the points the targets name)
    python -m bench.run --gpu           # n16-3b on CUDA, 1/8/32 robots
    python -m bench.run --profile small:16   # + py-spy on the replica and the ingress during that served point
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bench.fleet import FleetReport, run_fleet_sync
from bench.harness import (RESULTS, ROOT, SERVE_CONFIG, ServeRun, bench_serve_config, ensure_checkpoint, log,
                           replica_pids, results_header, settle_replicas, write_results)
from bench.limit import interpolate, run_subprocess
from bench.profiling import CpuShare, start_profile, summarize_profile
from bench.report import Progress, fmt, plot_report, plot_sweep
from bench.serial_server import SerialServerProcess


# ---------------------------------------------------------------------------------------------------------
# plan


@dataclass
class Plan:
    presets: list[str]
    robots: list[int]
    duration_s: float  # measured window per point (at least; see point_times)
    warmup_s: float
    limit_batch_sizes: list[int]
    limit_min_time_s: float
    device: str
    torch_threads: int | None
    embodiment: str
    timeout_ms: int
    max_window_s: float
    max_warmup_s: float
    gpu: bool = False
    quick: bool = False
    robots_by_preset: dict[str, list[int]] = field(default_factory=dict)  # overrides `robots` per preset
    profile: set[tuple[str, int]] = field(default_factory=set)  # (preset, robots) points to py-spy
    keep_deadline: bool = False
    replicas: int | None = None  # num_replicas of the driven embodiment (default: as in serve_config.yaml)
    # The serial reference is also measured with this many torch threads (all cores: how upstream runs by
    # default); throughput targets compare with the faster of the two. None: only at torch_threads.
    serial_all_cores: int | None = None
    settle_max_s: float = 90.0  # autoscaling: drive the load until the replica count stops changing, at most this
    only: set[str] = field(default_factory=lambda: {"limit", "serial", "served"})
    # --torch-threads given: the served replicas get it too. Not given: they run as serve_config.yaml says
    # (no torch_threads: each replica sizes its threads to the cores free on the node, serving/cores.py).
    served_threads: bool = True


TARGETS_CPU = [
    # (id, preset, robots, kind, threshold, text)
    ("small-16-vs-serial", "small", 16, "ratio_serial", 1.6, "CPU small, 16 robots: served throughput >= 1.6x serial"),
    ("small-16-vs-limit", "small", 16, "ratio_limit", 0.9,
     "CPU small, 16 robots: served throughput >= 90% of the in-process limit at the mean batch size reached"),
    ("small-1-p50", "small", 1, "p50_delta", 5.0, "CPU small, 1 robot: served p50 within 5 ms of serial"),
    ("small-1-overhead", "small", 1, "overhead_delta", 5.0,
     "  (same, robust form: served p50 of latency - infer_ms within 5 ms of serial's)"),
    ("tiny-64-vs-serial", "tiny", 64, "ratio_serial", 4.0, "CPU tiny, 64 robots: served throughput >= 4x serial"),
]
QUICK_ROBOTS = {"tiny": [1, 64], "small": [1, 16]}
TARGETS_GPU = [
    ("n16-32-vs-serial", "n16-3b", 32, "ratio_serial", 8.0, "GPU n16-3b, 32 robots: served throughput >= 8x serial"),
    ("n16-32-p99", "n16-3b", 32, "p99_vs_p50_1", 3.0, "GPU n16-3b, 32 robots: served p99 <= 3x single-robot p50"),
]


def point_times(plan: Plan, robots: int, limit_rows: list[dict] | None) -> tuple[float, float]:
    """(warmup, window) for a point: at least the plan's, and long enough for the slowest server (serial) to
    answer every robot about once in warmup and twice in the window; capped."""
    warmup, window = plan.warmup_s, plan.duration_s
    if limit_rows:
        per_sample_s = 1.0 / max(1e-9, interpolate(limit_rows, 1) or 1e9)
        round_s = robots * per_sample_s  # one answer per robot, one at a time
        warmup = max(warmup, min(plan.max_warmup_s, 1.0 * round_s))
        window = max(window, min(plan.max_window_s, 2.0 * round_s))
    return round(warmup, 1), round(window, 1)


# ---------------------------------------------------------------------------------------------------------
# helpers


def driven_deployment(config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The deployment entry, in a bench serve config, of the embodiment the robots drive ({} if it has none)."""
    return next((d for d in config["applications"][0].get("deployments", []) if d.get("name") == plan.embodiment), {})


def max_replicas(deployment: dict[str, Any]) -> int:
    """The most replicas a deployment entry of a serve config can run."""
    auto = deployment.get("autoscaling_config")
    if auto:
        return int(auto.get("max_replicas", 1))
    return int(deployment.get("num_replicas", 1))


# ---------------------------------------------------------------------------------------------------------
# the three measurements


def measure_limit(plan: Plan, checkpoint: Path, processes: Sequence[int] = (1,)) -> dict[str, Any]:
    """The limit with one process, and with P processes side by side for each P > 1 in `processes` (what P
    replicas of `torch_threads` threads each could do on this machine without any serving): samples/s summed."""
    from concurrent.futures import ThreadPoolExecutor

    result: dict[str, Any] = {}
    for p in sorted(set(processes)):
        log(f"  limit: policy.get_actions in-process, B = {', '.join(map(str, plan.limit_batch_sizes))}"
            + (f", {p} processes side by side" if p > 1 else ""))
        share = CpuShare()
        with ThreadPoolExecutor(p) as pool:
            runs = list(pool.map(lambda _: run_subprocess(
                str(checkpoint), plan.embodiment, plan.limit_batch_sizes, torch_threads=plan.torch_threads,
                device=plan.device, min_time_s=plan.limit_min_time_s), range(p)))
        cpu = share.result()
        rows = [dict(r, samples_per_s=round(sum(run["rows"][i]["samples_per_s"] for run in runs), 3))
                for i, r in enumerate(runs[0]["rows"])]
        if p == 1:
            result.update(runs[0], cpu=cpu)
        result.setdefault("rows_by_processes", {})[p] = rows
        for r in rows:
            log(f"    B={r['batch_size']:3d}: {r['samples_per_s']:9.2f} samples/s ({r['ms_per_call']:.1f} ms per call)")
        log(f"    (cores used: ours {cpu['ours_cores']:.2f}, others {cpu['foreign_cores']:.2f})")
    return result


def sweep(plan: Plan, label: str, preset: str, targets: list, limit_rows: list[dict] | None,
          profile_pids: dict[str, int] | None = None, results_dir: Path | None = None, stamp: str = "",
          settle_app: str | None = None) -> list[dict]:
    out = []
    for n in plan.robots_by_preset.get(preset, plan.robots):
        warmup, window = point_times(plan, n, limit_rows)
        settled = settle_replicas(plan, targets, n, settle_app) if settle_app else None
        progress = Progress(prefix=f"    [{label} {n} robots] ")
        profiles: dict[str, tuple[subprocess.Popen, Path]] = {}
        if profile_pids and (preset, n) in plan.profile and results_dir is not None:
            for name, pid in profile_pids.items():
                path = results_dir / f"profile-{stamp}-{preset}-{label}-{n}-{name}.txt"
                proc = start_profile(pid, warmup + window, path)
                if proc is not None:
                    profiles[name] = (proc, path)
        load_before = os.getloadavg()[0]
        share = CpuShare()
        try:
            report = run_fleet_sync(targets, n, warmup + window, warmup_s=warmup, timeout_ms=plan.timeout_ms,
                                    progress=progress, label=f"{label} {n} robots", seed=n)
        finally:
            progress.done()
        cpu = share.result()
        load_after = os.getloadavg()[0]
        doc = report.to_json(with_latencies=True)
        doc["loadavg_1m"] = [round(load_before, 2), round(load_after, 2)]
        doc["cpu"] = cpu
        if settled is not None:
            doc["settle"] = settled
        lat = report.latency_ms
        log(f"    {label:>6} {n:3d} robots: {report.samples_per_s:8.2f} samples/s  p50 {fmt(lat['p50'])} "
            f"p99 {fmt(lat['p99'])} ms  batch {fmt(report.mean_batch_size, 2)}  errors {report.errors}"
            + (f"  replicas {len(report.replicas)}" if report.replicas else "") +
            f"  (window {report.window_s:.0f}s; cores used: ours {cpu['ours_cores']:.2f}, others {cpu['foreign_cores']:.2f})")
        log("      cores by role: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu["by_role"].items()))
        if report.errors:
            log(f"      errors: {report.errors_by_kind}")
        for name, (proc, path) in profiles.items():
            try:
                proc.wait(timeout=warmup + window + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
            summary = summarize_profile(path)
            doc.setdefault("profile", {})[name] = {"file": str(path.relative_to(ROOT)), **summary}
            log(f"      profile {name}: {summary.get('samples', 0)} samples at 50 Hz; where they went:")
            for what, p in summary.get("categories_pct_of_all", [])[:10]:
                log(f"        {p:5.1f}%  {what}")
        out.append(doc)
    return out


def measure_serial(plan: Plan, checkpoint: Path, limit_rows, results_dir: Path, stamp: str,
                   torch_threads: int | None) -> list[dict]:
    log(f"  serial (reference): bench/serial_server.py, one REP socket, torch threads {torch_threads or 'default'}")
    log_path = results_dir / f"serial-{stamp}-{torch_threads or 'default'}.log"
    with SerialServerProcess(str(checkpoint), plan.embodiment, device=plan.device, torch_threads=torch_threads,
                             log_path=str(log_path)) as server:
        target = f"127.0.0.1:{server.port}"
        pids = {"serial": server.pid}
        return sweep(plan, "serial", _preset_of(checkpoint), [target], limit_rows, pids, results_dir, stamp)


def _preset_of(checkpoint: Path) -> str:
    return checkpoint.name


def measure_served(plan: Plan, checkpoint: Path, limit_rows, results_dir: Path, stamp: str) -> tuple[list[dict], dict]:
    preset = checkpoint.name
    config = bench_serve_config(checkpoint, plan)
    app = config["applications"][0]
    ports = {p["embodiment"]: p["port"] for p in app["args"]["ingress"]["ports"]}
    if plan.embodiment not in ports:
        raise SystemExit(f"--embodiment {plan.embodiment!r} is not served by {SERVE_CONFIG.name}: {sorted(ports)}")
    dep = driven_deployment(config, plan)
    log(f"  served: `serve run` of {SERVE_CONFIG.name} (checkpoint, device, torch_threads {plan.torch_threads or 'default'}, "
        f"ports substituted); {plan.embodiment}: "
        f"{'autoscaling ' + str(dep['autoscaling_config']) if dep.get('autoscaling_config') else 'num_replicas ' + str(dep.get('num_replicas', 1))}, "
        f"{dep.get('ray_actor_options')}, user_config {dep.get('user_config')}, "
        f"ingress request_timeout_ms {app['args']['ingress'].get('request_timeout_ms', 'default')}")
    runner = ServeRun(config, results_dir / f"serve-config-{stamp}-{preset}.yaml", results_dir / f"serve-{stamp}-{preset}.log")
    try:
        t0 = time.perf_counter()
        target = f"127.0.0.1:{ports[plan.embodiment]}"
        runner.wait_ready(target)
        log(f"    app up in {time.perf_counter() - t0:.1f} s")
        pids = replica_pids(app["name"])
        profile_pids = {k: v for k, v in pids.items() if k in (plan.embodiment, "ZmqIngress")}
        autoscaled = bool(dep.get("autoscaling_config"))
        reports = sweep(plan, "served", preset, [target], limit_rows, profile_pids, results_dir, stamp,
                        settle_app=app["name"] if autoscaled else None)
        return reports, {"app": app["name"], "config": config, "pids": pids}
    finally:
        runner.stop()


# ---------------------------------------------------------------------------------------------------------
# analysis


def analyse(preset_result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    serial = {r["robots"]: r for r in preset_result.get("serial", [])}
    serial_all = {r["robots"]: r for r in preset_result.get("serial_all_cores", [])}
    served = {r["robots"]: r for r in preset_result.get("served", [])}
    limit = preset_result.get("limit") or {}
    limit_by_processes = {int(k): v for k, v in (limit.get("rows_by_processes") or {}).items()}
    for n in sorted(set(serial) | set(served)):
        s, v = serial.get(n), served.get(n)
        row: dict[str, Any] = {"robots": n}
        if s:
            row.update(serial_sps=s["samples_per_s"], serial_p50=s["latency_ms"]["p50"], serial_p99=s["latency_ms"]["p99"],
                       serial_errors=s["errors"], serial_foreign_cores=(s.get("cpu") or {}).get("foreign_cores"))
        if v:
            row.update(served_sps=v["samples_per_s"], served_p50=v["latency_ms"]["p50"], served_p99=v["latency_ms"]["p99"],
                       served_batch=v["mean_batch_size"], served_errors=v["errors"],
                       served_foreign_cores=(v.get("cpu") or {}).get("foreign_cores"))
        if s and v and s["samples_per_s"]:
            row["served_vs_serial"] = round(v["samples_per_s"] / s["samples_per_s"], 3)
        a = serial_all.get(n)
        if a:
            row.update(serial_all_sps=a["samples_per_s"], serial_all_p50=a["latency_ms"]["p50"])
        best = max((x["samples_per_s"] for x in (s, a) if x), default=None)
        if v and best:
            # against the faster serial server: one thread (the replicas' count) or all cores (upstream's default)
            row["served_vs_best_serial"] = round(v["samples_per_s"] / best, 3)
        if s and v and s["latency_ms"]["p50"] is not None and v["latency_ms"]["p50"] is not None:
            row["p50_delta_ms"] = round(v["latency_ms"]["p50"] - s["latency_ms"]["p50"], 2)
        # latency - the server's own infer_ms: what each server adds around the forward pass (robust to the
        # forward pass running a few % faster or slower in one process than in another)
        for name, d in (("serial", s), ("served", v)):
            if d and (d.get("overhead_ms") or {}).get("p50") is not None:
                row[f"{name}_overhead_p50"] = d["overhead_ms"]["p50"]
        if n == 1 and row.get("serial_overhead_p50") is not None and row.get("served_overhead_p50") is not None:
            # (one robot only: with more, a REP server's queueing happens in ZMQ and counts as its "overhead")
            row["overhead_delta_ms"] = round(row["served_overhead_p50"] - row["serial_overhead_p50"], 2)
        # the limit of as many processes as replicas answered in the window (side by side, summed)
        replicas = len(v.get("replicas") or {}) if v else 0
        fits = [p for p in limit_by_processes if p <= max(1, replicas)]
        limit_rows = limit_by_processes[max(fits)] if fits else limit.get("rows")
        if v and limit_rows and v.get("mean_batch_size"):
            lim = interpolate(limit_rows, v["mean_batch_size"])
            row["limit_at_batch"] = round(lim, 3)
            row["served_replicas"] = replicas or None
            row["limit_processes"] = max(fits) if fits else 1
            row["served_vs_limit"] = round(v["samples_per_s"] / lim, 3) if lim else None
        rows.append(row)
    return rows


def check_targets(results: dict[str, Any], targets: list[tuple]) -> list[dict[str, Any]]:
    out = []
    for tid, preset, n, kind, threshold, text in targets:
        rows = {r["robots"]: r for r in results.get("presets", {}).get(preset, {}).get("table", [])}
        row = rows.get(n)
        value, ok = None, None
        if row is not None:
            if kind == "ratio_serial":
                value = row.get("served_vs_best_serial", row.get("served_vs_serial"))
                ok = None if value is None else value >= threshold
            elif kind == "ratio_limit":
                value = row.get("served_vs_limit")
                ok = None if value is None else value >= threshold
            elif kind == "p50_delta":
                value = row.get("p50_delta_ms")
                ok = None if value is None else value <= threshold
            elif kind == "overhead_delta":
                value = row.get("overhead_delta_ms")
                ok = None if value is None else value <= threshold
            elif kind == "p99_vs_p50_1":
                one = rows.get(1)
                if one and one.get("served_p50") and row.get("served_p99") is not None:
                    value = round(row["served_p99"] / one["served_p50"], 3)
                    ok = value <= threshold
        out.append({"id": tid, "target": text, "threshold": threshold, "value": value,
                    "status": "n/a" if ok is None else ("PASS" if ok else "MISS")})
    return out


def print_tables(results: dict[str, Any]) -> None:
    for preset, pr in results["presets"].items():
        lim = pr.get("limit")
        log("")
        log(f"== {preset} ({results['plan']['device']}, torch threads {pr.get('torch_threads')}, "
            f"embodiment {results['plan']['embodiment']}) ==")
        if lim:
            log("limit (in-process get_actions, no network): " + ", ".join(
                f"B={r['batch_size']} {r['samples_per_s']:.2f}/s" for r in lim["rows"]))
        all_cores = pr.get("serial_all_cores_threads")
        log(f"{'robots':>6} | {'serial(ref) s/s':>15} {'p50':>8} {'p99':>8} | {'served s/s':>10} {'p50':>8} {'p99':>8} "
            f"{'batch':>6} {'reps':>4} | {'srv/ser':>7} {'ser@' + str(all_cores or '-'):>7} {'srv/best':>8} {'limit@b':>8} "
            f"{'srv/lim':>7} {'dp50 ms':>8} {'d-ovh ms':>8} | {'others ser/srv':>14}")
        for r in pr.get("table", []):
            log(f"{r['robots']:>6} | {fmt(r.get('serial_sps'), 2):>15} {fmt(r.get('serial_p50')):>8} {fmt(r.get('serial_p99')):>8} | "
                f"{fmt(r.get('served_sps'), 2):>10} {fmt(r.get('served_p50')):>8} {fmt(r.get('served_p99')):>8} "
                f"{fmt(r.get('served_batch'), 2):>6} {r.get('served_replicas') or '-':>4} | {fmt(r.get('served_vs_serial'), 2):>7} "
                f"{fmt(r.get('serial_all_sps'), 2):>7} {fmt(r.get('served_vs_best_serial'), 2):>8} {fmt(r.get('limit_at_batch'), 2):>8} "
                f"{fmt(r.get('served_vs_limit'), 2):>7} {fmt(r.get('p50_delta_ms'), 1):>8} {fmt(r.get('overhead_delta_ms'), 1):>8} | "
                f"{fmt(r.get('serial_foreign_cores'), 2):>6} /{fmt(r.get('served_foreign_cores'), 2):>6}")
        log(f"  (serial(ref): at the replicas' torch threads; ser@N: the serial server with N threads (all cores); "
            "srv/best: served / the faster of the two; reps: replicas that answered; limit@b: the limit of that many "
            "processes side by side at the mean batch reached; dp50: served p50 - serial p50; d-ovh: the same for "
            "latency - the server's infer_ms, i.e. what each server adds around the forward pass; others ser/srv: cores "
            "other processes on this machine used during the point, 0 = a clean measurement)")
    log("")
    log("targets:")
    for t in results["targets"]:
        log(f"  {t['status']:4}  {t['target']}: {'-' if t['value'] is None else t['value']} (threshold {t['threshold']})")


def make_plots(results: dict[str, Any], stamp: str) -> list[str]:
    def as_report(doc: dict) -> FleetReport:
        fields = {k: v for k, v in doc.items() if k in FleetReport.__dataclass_fields__}
        return FleetReport(**fields)

    written = []
    for preset, pr in results["presets"].items():
        series = {}
        if pr.get("serial"):
            series["serial (reference)"] = [as_report(d) for d in pr["serial"]]
        if pr.get("serial_all_cores"):
            series[f"serial, {pr.get('serial_all_cores_threads')} threads"] = [as_report(d) for d in pr["serial_all_cores"]]
        if pr.get("served"):
            series["served (fleetserve)"] = [as_report(d) for d in pr["served"]]
        if not series:
            continue
        limits = {f"limit B={r['batch_size']}": r["samples_per_s"] for r in (pr.get("limit") or {}).get("rows", [])}
        path = RESULTS / f"bench-{stamp}-{preset}-sweep.png"
        plot_sweep(series, str(path), title=f"{preset}: throughput and latency vs robots ({results['plan']['device']})",
                   limits=limits)
        written.append(path)
        reports = [r for rs in series.values() for r in rs]
        path = RESULTS / f"bench-{stamp}-{preset}-latency.png"
        plot_report(reports, str(path), title=f"{preset}: latency distribution per point")
        written.append(path)
    for path in written:  # stable names too
        shutil.copyfile(path, path.with_name(path.name.replace(f"bench-{stamp}", "latest")))
    return [str(p.relative_to(ROOT)) for p in written]


# ---------------------------------------------------------------------------------------------------------
# main


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_plan(argv: Sequence[str] | None) -> Plan:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=None, help="comma-separated presets (default tiny,small; --gpu: n16-3b)")
    p.add_argument("--robots", default=None, help="comma-separated robot counts (default 1,4,16,64; --gpu: 1,8,32)")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per point, at least (default 15; --quick 4); stretched for slow points, see --max-window")
    p.add_argument("--warmup", type=float, default=None, help="seconds before each point's window (default 3; --quick 1)")
    p.add_argument("--max-window", type=float, default=None, help="cap of a stretched window (default 45 s; --quick 8)")
    p.add_argument("--limit-batch-sizes", default=None, help="default 1,4,16,64 (--quick: 1,16)")
    p.add_argument("--limit-time", type=float, default=None, help="seconds per limit batch size (default 3; --quick 1)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads of the replica, the serial server and the limit alike (default 1 on CPU)")
    p.add_argument("--embodiment", default="gr1", help="the embodiment the robots drive (default gr1)")
    p.add_argument("--timeout-ms", type=int, default=180_000)
    p.add_argument("--quick", action="store_true",
                   help="smoke run, ~5 min: only the target points (tiny 1,64; small 1,16 robots), limit at B=1,16, short windows")
    p.add_argument("--gpu", action="store_true", help="n16-3b on CUDA (robots 1,8,32)")
    p.add_argument("--profile", default=None, metavar="PRESET:ROBOTS[,...]",
                   help="py-spy record the replica and the ingress (and the serial server) during these points")
    p.add_argument("--keep-deadline", action="store_true",
                   help="keep serve_config.yaml's ingress request_timeout_ms (load shedding); by default the bench lifts "
                   "it to --timeout-ms so both servers answer every request and throughput compares capacity")
    p.add_argument("--replicas", type=int, default=None,
                   help="num_replicas of the driven embodiment's deployment (default: serve_config.yaml's)")
    p.add_argument("--only", default="limit,serial,served", help="subset of limit,serial,served")
    p.add_argument("--no-serial-all-cores", action="store_true",
                   help="measure the serial reference only at --torch-threads, not also with all cores")
    a = p.parse_args(argv)
    quick = a.quick
    if a.gpu:
        presets = a.presets or "n16-3b"
        robots = a.robots or "1,8,32"
        device = "cuda"
    else:
        presets = a.presets or "tiny,small"
        robots = a.robots or "1,4,16,64"
        device = "cpu"
    profile = set()
    for item in (a.profile or "").split(","):
        if item.strip():
            name, _, n = item.strip().partition(":")
            profile.add((name, int(n)))
    threads = a.torch_threads if a.torch_threads is not None else (None if a.gpu else 1)
    return Plan(
        presets=[x for x in presets.split(",") if x],
        robots=_int_list(robots),
        duration_s=a.duration if a.duration is not None else (4.0 if quick else 15.0),
        warmup_s=a.warmup if a.warmup is not None else (1.0 if quick else 3.0),
        limit_batch_sizes=_int_list(a.limit_batch_sizes or ("1,16" if quick else "1,4,16,64")),
        limit_min_time_s=a.limit_time if a.limit_time is not None else (1.0 if quick else 3.0),
        device=device,
        torch_threads=threads,
        served_threads=a.torch_threads is not None or a.gpu,
        embodiment=a.embodiment,
        timeout_ms=a.timeout_ms,
        max_window_s=a.max_window if a.max_window is not None else (8.0 if quick else 45.0),
        max_warmup_s=8.0 if quick else 25.0,
        gpu=a.gpu,
        quick=quick,
        profile=profile,
        keep_deadline=a.keep_deadline,
        replicas=a.replicas,
        serial_all_cores=None if (a.gpu or a.no_serial_all_cores) else os.cpu_count(),
        only=set(a.only.split(",")),
        # --quick measures just the points the CPU targets name
        robots_by_preset=dict(QUICK_ROBOTS) if quick and not a.robots and not a.gpu else {},
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = build_plan(argv)
    if plan.gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench --gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                  f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). "
                  "Run the CPU benchmark instead: python -m bench.run", file=sys.stderr)
            return 2
    RESULTS.mkdir(parents=True, exist_ok=True)  # the servers' logs go there before the results do
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        **results_header("bench.run", argv, plan.device),
        "plan": {k: (sorted(v) if isinstance(v, set) else v) for k, v in plan.__dict__.items()},
        "presets": {},
    }
    log(f"bench: presets {plan.presets}, robots {plan.robots_by_preset or plan.robots}, device {plan.device}, torch threads "
        f"{plan.torch_threads or 'default'}, >= {plan.duration_s:g} s per point (+{plan.warmup_s:g} s warmup)")
    log(f"machine: {results['machine']['cpu']} x{results['machine']['cpu_count']}, load {results['machine']['loadavg_at_start']}")
    if plan.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(plan.torch_threads)
    for preset in plan.presets:
        log(f"\n== {preset} ==")
        checkpoint = ensure_checkpoint(preset)
        pr: dict[str, Any] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "torch_threads": plan.torch_threads}
        results["presets"][preset] = pr
        if "limit" in plan.only:
            driven = driven_deployment(bench_serve_config(checkpoint, plan), plan)
            pr["limit"] = measure_limit(plan, checkpoint, processes=(1, max_replicas(driven)))
            pr["torch_threads"] = pr["limit"]["torch_threads"]
        limit_rows = (pr.get("limit") or {}).get("rows")
        if "serial" in plan.only:
            pr["serial"] = measure_serial(plan, checkpoint, limit_rows, RESULTS, stamp, plan.torch_threads)
            if plan.serial_all_cores and plan.serial_all_cores != plan.torch_threads:
                pr["serial_all_cores"] = measure_serial(plan, checkpoint, limit_rows, RESULTS, stamp, plan.serial_all_cores)
                pr["serial_all_cores_threads"] = plan.serial_all_cores
        if "served" in plan.only:
            pr["served"], pr["app"] = measure_served(plan, checkpoint, limit_rows, RESULTS, stamp)
        pr["table"] = analyse(pr)
    results["targets"] = check_targets(results, TARGETS_GPU if plan.gpu else TARGETS_CPU)
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_tables(results)
    try:
        results["plots"] = make_plots(results, stamp)
    except Exception as exc:  # noqa: BLE001 - the figures matter more than the pictures
        log(f"plots failed: {exc}")
    path = write_results("bench", stamp, results)
    log(f"\nwrote {path.relative_to(ROOT)} (and bench/results/bench-latest.json); plots: {', '.join(results.get('plots', []))}")
    log(f"elapsed {results['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
