"""`python -m bench.multiplex`: many fine-tunes of one embodiment on a shared pool vs a deployment per fine-tune.

Two layouts of the same K fine-tunes (demo checkpoints of one preset, seeds 0..K-1, gr1), each started with
`serve run` of a generated config (its own local Ray), driven by the same robots:

  pooled     ONE app: the gr1 policy deployment on `--replicas` replicas (2) serving fine-tune 0 as its default
             model and the others as Serve-multiplexed models, at most `--max-models` loaded per replica;
  dedicated  K apps: one policy deployment (one replica) per fine-tune, each with its own port, the same
             cores (logical Ray CPUs, torch threads) divided among them.

Robots pick a fine-tune per request with Zipf popularity (P(rank r) ~ 1/r^s), so a few are hot and most are
idle. Figures: throughput (answers/s), latency p50/p99 (client side), the cold-load rate (share of requests
that waited for their model to load, from the ingress's status page), the load time the replicas measured,
and the memory of the policy replicas (resident set size summed over their processes). Writes
bench/results/multiplex-<timestamp>.json.

A layout that cannot fit this machine is skipped, not started: its memory is estimated first (one fine-tune
loaded in a subprocess, its resident set measured, times the layout's replicas, plus the pool's extra models
and the ingresses) against MemAvailable. A layout not answering within `--start-timeout-s` is skipped too.
Either way the JSON and the table say why, and the other layout's figures stand.

    python -m bench.multiplex                # 32 fine-tunes (small), 32 robots, 60 s per layout
    python -m bench.multiplex --quick        # smoke run: 4 tiny fine-tunes, 4 robots, 8 s per layout
    python -m bench.multiplex --device cuda  # a GPU: the pool's replicas share it, as do the dedicated ones
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zmq.asyncio

from bench.harness import CACHE, RESULTS, ServeRun, free_port, log, replica_processes, results_header, status_page, write_results
from bench.robots import ACTION, Outcome, Request, Robot, Target, build_payloads, fetch_info, run_robots
from bench.stats import percentile

POLICY = "gr1"
# Logical Ray CPUs kept for the ingresses (one per app); the rest is divided among the policy replicas.
INGRESS_CPUS = 0.5


def fine_tunes(preset: str, count: int) -> list[Path]:
    """Demo fine-tunes of one preset (seed i -> fine-tune i), built offline once into bench/.cache."""
    from policy import ensure_demo_checkpoint

    root = CACHE / "multiplex"
    paths = []
    for seed in range(count):
        path = root / f"{preset}-{POLICY}-seed{seed}"
        if not (path / "config.json").exists():
            log(f"building fine-tune {seed} ({preset}) at {path}")
        paths.append(ensure_demo_checkpoint(path, preset, embodiments=(POLICY,), seed=seed))
    return paths


def _app(name: str, port: int, embodiment: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    from serving.config import LOW_LATENCY_ENV_VARS

    return {
        "name": name, "route_prefix": f"/{name}", "import_path": "serving.app:build_app",
        "runtime_env": {"env_vars": dict(LOW_LATENCY_ENV_VARS)},
        "args": {"ingress": {"host": "127.0.0.1", "ports": [{"port": port, "embodiment": POLICY}],
                             "request_timeout_ms": 120_000},
                 "embodiments": {POLICY: embodiment}},
        "deployments": [{"name": POLICY, **policy}, {"name": "ZmqIngress", "ray_actor_options": {"num_cpus": 0.01}}],
    }


def _actor_options(cpus: float, gpus: float) -> dict[str, Any]:
    return {"num_cpus": round(cpus, 3), **({"num_gpus": round(gpus, 3)} if gpus else {})}


def pooled_config(paths: list[Path], args) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """One app: fine-tune 0 is the default model, the rest are multiplexed. Returns (config, route per rank)."""
    port = free_port()
    threads = max(1, args.cores // args.replicas)  # torch threads: the same cores as the dedicated layout
    embodiment = {"checkpoint": str(paths[0]), "device": args.device, "torch_threads": threads,
                  "models": {f"ft{i}": {"checkpoint": str(p)} for i, p in enumerate(paths) if i},
                  "max_models_per_replica": args.max_models}
    gpus = 1.0 / args.replicas if args.device.startswith("cuda") else 0
    policy = {"num_replicas": args.replicas,
              "ray_actor_options": _actor_options((args.cores - INGRESS_CPUS) / args.replicas, gpus)}
    config = {"http_options": {"host": "127.0.0.1", "port": free_port()},
              "applications": [_app("mux-pooled", port, embodiment, policy)]}
    routes = [(port, "default" if i == 0 else f"ft{i}") for i in range(len(paths))]
    return config, routes


def dedicated_config(paths: list[Path], args) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """One app (ingress + one policy replica) per fine-tune, the cores divided among them."""
    apps, routes = [], []
    share = (args.cores - INGRESS_CPUS) / len(paths)
    gpus = 1.0 / len(paths) if args.device.startswith("cuda") else 0
    for i, path in enumerate(paths):
        port = free_port()
        embodiment = {"checkpoint": str(path), "device": args.device, "torch_threads": max(1, int(share))}
        apps.append(_app(f"mux-solo{i}", port, embodiment, {"num_replicas": 1, "ray_actor_options": _actor_options(share, gpus)}))
        routes.append((port, "default"))
    return {"http_options": {"host": "127.0.0.1", "port": free_port()}, "applications": apps}, routes


def zipf(count: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, count + 1) ** s
    return p / p.sum()


def drive(routes: list[tuple[int, str]], args, duration_s: float, seed: int) -> dict[str, Any]:
    """`args.robots` robots, each sending get_action for a Zipf-chosen fine-tune, one at a time, for duration_s."""
    embodiment = fetch_info(f"127.0.0.1:{routes[0][0]}", timeout_ms=120_000)["embodiments"][POLICY]
    weights = zipf(len(routes), args.zipf)
    payloads = [build_payloads(Target("127.0.0.1", port), embodiment, 1, None, 2, seed * 1000 + rank, model_id=model)
                for rank, (port, model) in enumerate(routes)]
    rngs = [np.random.default_rng(seed * 1000 + i) for i in range(args.robots)]
    latencies: list[float] = []
    errors: list[str] = []
    per_rank = np.zeros(len(routes), dtype=int)

    def next_request(robot: Robot) -> Request:
        rank = int(rngs[robot.index].choice(len(routes), p=weights))
        port, _model = routes[rank]
        return Request(f"tcp://127.0.0.1:{port}", payloads[rank][robot.sent % 2], 120.0, rank)

    def count(outcome: Outcome) -> None:
        if outcome.status != ACTION:
            port, model = routes[outcome.request.label]
            errors.append(f"{model}@{port}: {outcome.label} {outcome.message or ''}"[:200])
            return
        latencies.append(outcome.latency_ms)
        per_rank[outcome.request.label] += 1

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        try:
            crew = [Robot(i, ctx, next_request, count) for i in range(args.robots)]
            await run_robots(crew, time.perf_counter() + duration_s, drain_s=180.0)
        finally:
            ctx.destroy(linger=0)

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    return {
        "answers": len(latencies), "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "answers_by_rank": per_rank.tolist(),
    }


def status_pages(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every app's status page ({} for one that could not be read: its cold-load figures are then missing)."""
    port = config["http_options"]["port"]
    return [status_page(f"http://127.0.0.1:{port}{app['route_prefix']}") or {} for app in config["applications"]]


def rss_mb(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            pass
    return round(total, 1)


# Run in a subprocess: the resident set of a process like a policy replica (Ray and Serve imported, as in every
# replica), before any model, and with one fine-tune loaded and answering once (a forward pass touches every
# weight: a memory-mapped checkpoint is resident only then). The first figure stands for an ingress replica.
_REPLICA_RSS = """
import json, os, sys
from ray import serve
import serving.policy_deployment, serving.ingress

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

bare = rss_mb()
from clients.observations import random_observation
from policy import load_policy
policy = load_policy(sys.argv[1], sys.argv[2], device=sys.argv[3])
policy.get_action(random_observation(policy.describe(), 1), {})
print(json.dumps({"process_mb": bare, "replica_mb": rss_mb()}))
"""
# Margins of the fit check: the share of MemAvailable left free (page cache, the robots' threads, growth while
# serving), and Ray's own processes besides the replicas (GCS, raylet, dashboard: about 0.5 GB here).
FREE_SHARE = 0.1
RAY_BASE_MB = 600.0


def replica_memory(checkpoint: Path, device: str) -> dict[str, float]:
    """Resident MB of a bare Serve process and of one with `checkpoint` loaded, and the checkpoint's MB on disk."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _REPLICA_RSS, str(checkpoint), POLICY, device], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["checkpoint_mb"] = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file()) / 2**20
    return {k: round(v, 1) for k, v in figures.items()}


def mem_available_mb() -> float:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping (or the OOM killer)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def layout_memory_mb(layout: str, memory: dict[str, float], fine_tunes: int, replicas: int, max_models: int,
                     worker_mb: float = 0.0) -> dict:
    """What a layout will hold resident: its policy replicas (each with its models), its ingresses, and Ray's own
    processes (controller, proxy: bare Serve processes; GCS and raylet: RAY_BASE_MB). `worker_mb`: what a Ray
    worker process holds beyond the subprocess's figures (measured on a layout that ran), added per process."""
    if layout == "pooled":  # the default model plus up to max_models fine-tunes per replica
        policy_replicas, ingresses = replicas, 1
        per_replica = memory["replica_mb"] + min(max_models, fine_tunes - 1) * memory["checkpoint_mb"]
    else:  # one replica, one model, one ingress per fine-tune
        policy_replicas, ingresses, per_replica = fine_tunes, fine_tunes, memory["replica_mb"]
    per_replica += worker_mb
    total = policy_replicas * per_replica + (ingresses + 2) * (memory["process_mb"] + worker_mb) + RAY_BASE_MB
    return {"policy_replicas": policy_replicas, "per_replica_mb": round(per_replica, 1), "total_mb": round(total, 1)}


def fit_check(estimate: dict[str, Any], available_mb: float, free_share: float = FREE_SHARE) -> str | None:
    """None if the layout fits in MemAvailable less the free share, else why it does not (skipped, not started)."""
    usable = available_mb * (1.0 - free_share)
    if estimate["total_mb"] <= usable:
        return None
    gb = 1024.0
    return (f"does not fit: {estimate['policy_replicas']} replicas x {estimate['per_replica_mb'] / gb:.1f} GB "
            f"(+ ingresses and Ray) = {estimate['total_mb'] / gb:.1f} GB > {usable / gb:.1f} GB available "
            f"({1 - free_share:.0%} of MemAvailable {available_mb / gb:.1f} GB)")


def cold_load_figures(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """The load time the replicas measured (ms), per model, over the batches that waited on a load (status pages)."""
    by_model = {name: m["cold_load_ms_mean"] for page in pages for name, m in page.get("models", {}).items()
                if "cold_load_ms_mean" in m}
    mean = round(sum(by_model.values()) / len(by_model), 1) if by_model else None
    return {"cold_load_ms_mean": mean, "cold_load_ms_by_model": by_model}


def loads_by_preset(routes: list[tuple[int, str]]) -> list[dict[str, float]]:
    """Each app's slowest model load per preset, as its replicas measured it (`info`), startup loads included."""
    from clients import PolicyClient

    out = []
    for port in sorted({p for p, _ in routes}):
        with PolicyClient("127.0.0.1", port, timeout_ms=120_000) as c:
            out.append(c.info()["embodiments"][POLICY].get("cold_load_ms_by_preset", {}))
    return out


def measure(label: str, config: dict[str, Any], routes: list[tuple[int, str]], args, out_dir: Path, stamp: str) -> dict:
    runner = ServeRun(config, out_dir / f"multiplex-{stamp}-{label}.yaml", out_dir / f"multiplex-{stamp}-{label}.log")
    try:
        t0 = time.perf_counter()
        try:
            for port in sorted({p for p, _ in routes}):
                left = args.start_timeout_s - (time.perf_counter() - t0)
                if left <= 0:
                    raise TimeoutError
                runner.wait_ready(f"127.0.0.1:{port}", timeout_s=left)
        except (TimeoutError, RuntimeError) as exc:  # recorded; the other layout's run goes on
            late = time.perf_counter() - t0 >= args.start_timeout_s
            why = f"not up after {args.start_timeout_s:.0f} s" if late else str(exc)
            log(f"  {label}: skipped, {why}")
            return {"skipped": why}
        startup_s = round(time.perf_counter() - t0, 1)
        log(f"  {label}: {len(config['applications'])} app(s) up in {startup_s} s")
        drive(routes, args, args.warmup_s, seed=1)  # every fine-tune answered once where the Zipf tail allows
        before = status_pages(config)
        result = drive(routes, args, args.duration_s, seed=2)
        after = status_pages(config)

        def totals(pages):
            models = [m for page in pages for m in page.get("models", {}).values()]
            return sum(m["requests"] for m in models), sum(m["cold_load_requests"] for m in models)

        (n0, c0), (n1, c1) = totals(before), totals(after)
        result["cold_load_rate"] = round((c1 - c0) / max(1, n1 - n0), 4)
        result.update(cold_load_figures(after))
        # The default model's figure counts from the replica's start (imports included): not a fine-tune's load.
        result["slowest_load_ms_incl_startup"] = max((ms for app in loads_by_preset(routes) for ms in app.values()),
                                                     default=None)
        result["startup_s"] = startup_s
        processes = [replica_processes(app["name"]) for app in config["applications"]]
        pids = [pid for by_dep in processes for pid in by_dep.get(POLICY, [])]
        ingress_pids = [pid for by_dep in processes for pid in by_dep.get("ZmqIngress", [])]
        result["policy_replicas"] = len(pids)
        result["policy_rss_mb"] = rss_mb(pids)
        result["ingress_rss_mb_each"] = round(rss_mb(ingress_pids) / max(1, len(ingress_pids)), 1)
        log(f"  {label}: {result['throughput_rps']} answers/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
            f"cold-load rate {result['cold_load_rate']:.1%} (loads {result['cold_load_ms_mean']} ms), "
            f"{result['policy_replicas']} policy replicas using {result['policy_rss_mb']} MB, {result['errors']} errors")
        return result
    finally:
        runner.stop()


def print_table(layouts: dict[str, dict[str, Any]]) -> None:
    cols = [("answers/s", "throughput_rps"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
            ("cold-load rate", "cold_load_rate"), ("cold load ms", "cold_load_ms_mean"),
            ("policy replicas", "policy_replicas"), ("policy RSS MB", "policy_rss_mb"), ("errors", "errors")]
    print(f"{'layout':<10} " + " ".join(f"{h:>15}" for h, _ in cols))
    for name, r in layouts.items():
        if "skipped" in r:
            print(f"{name:<10} skipped: {r['skipped']}")
        else:
            print(f"{name:<10} " + " ".join(f"{str(r.get(k, '-')):>15}" for _, k in cols))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.multiplex", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 4 tiny fine-tunes, 4 robots, 8 s per layout")
    p.add_argument("--preset", default=None, help="tiny, small (default) or n16-3b")
    p.add_argument("--fine-tunes", type=int, default=None, help="K (default 32)")
    p.add_argument("--robots", type=int, default=None, help="default 32")
    p.add_argument("--duration-s", type=float, default=None, help="measured window per layout (default 60)")
    p.add_argument("--warmup-s", type=float, default=None, help="default 15")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the shared pool")
    p.add_argument("--max-models", type=int, default=None, help="fine-tunes each pool replica keeps loaded (default 8)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of the fine-tunes' popularity")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores both layouts divide among replicas")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--layouts", default="pooled,dedicated")
    p.add_argument("--start-timeout-s", type=float, default=600.0,
                   help="a layout not answering within this long is skipped (recorded), the run goes on")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = {"preset": "tiny", "fine_tunes": 4, "robots": 4, "duration_s": 8.0, "warmup_s": 3.0, "max_models": 2}
    full = {"preset": "small", "fine_tunes": 32, "robots": 32, "duration_s": 60.0, "warmup_s": 15.0, "max_models": 8}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = fine_tunes(args.preset, args.fine_tunes)
    layouts = {"pooled": pooled_config, "dedicated": dedicated_config}
    results: dict[str, Any] = {**results_header("bench.multiplex", argv, args.device), "settings": vars(args),
                               "zipf_weights": [round(w, 4) for w in zipf(args.fine_tunes, args.zipf)], "layouts": {}}
    log(f"{args.fine_tunes} {args.preset} fine-tunes of {POLICY}, {args.robots} robots, Zipf s={args.zipf}, "
        f"{args.cores} cores, {args.device}")
    memory = replica_memory(paths[-1], args.device)
    results["replica_memory_mb"] = memory
    log(f"one {args.preset} fine-tune: a replica-like process holds {memory['replica_mb']} MB "
        f"({memory['process_mb']} MB before loading; checkpoint {memory['checkpoint_mb']} MB)")
    worker_mb = 0.0  # a Ray worker's own memory beyond the subprocess's, once a layout has run
    for name in args.layouts.split(","):
        estimate = layout_memory_mb(name, memory, args.fine_tunes, args.replicas, args.max_models, worker_mb)
        available = mem_available_mb()
        estimate["mem_available_mb"] = round(available, 1)
        skipped = fit_check(estimate, available)
        if skipped:
            log(f"  {name}: skipped, {skipped}")
            results["layouts"][name] = {"skipped": skipped, "memory_estimate": estimate}
            continue
        config, routes = layouts[name](paths, args)
        result = measure(name, config, routes, args, RESULTS, stamp)
        result["memory_estimate"] = estimate
        results["layouts"][name] = result
        if "ingress_rss_mb_each" in result:
            worker_mb = max(worker_mb, result["ingress_rss_mb_each"] - memory["process_mb"])
    print_table(results["layouts"])
    out = write_results("multiplex", stamp, results)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
