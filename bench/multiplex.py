"""`python -m bench.multiplex`: many fine-tunes of one embodiment on a shared pool vs a deployment per fine-tune.

Two layouts of the same K fine-tunes (demo checkpoints of one preset, seeds 0..K-1, gr1), each started with
`serve run` of a generated config (its own local Ray), driven by the same robots:

  pooled     ONE app: the gr1 policy deployment on `--replicas` replicas (2) serving fine-tune 0 as its default
             model and the others as Serve-multiplexed models, at most `--max-models` loaded per replica;
  dedicated  K apps: one policy deployment (one replica) per fine-tune, each with its own port, the same
             cores (logical Ray CPUs, torch threads) divided among them.

Robots pick a fine-tune per request with Zipf popularity (P(rank r) ~ 1/r^s), so a few are hot and most are
idle. Figures: throughput (answers/s), latency p50/p99 (client side), the cold-load rate (share of requests
that waited for their model to load, from the ingress's status page), and the memory of the policy replicas
(resident set size summed over their processes). Writes bench/results/multiplex-<timestamp>.json.

    python -m bench.multiplex                # 32 fine-tunes (small), 32 robots, 60 s per layout
    python -m bench.multiplex --quick        # smoke run: 4 tiny fine-tunes, 4 robots, 8 s per layout
    python -m bench.multiplex --device cuda  # a GPU: the pool's replicas share it, as do the dedicated ones
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.run import CACHE, RESULTS, ServeRun, free_port, log, machine_info, replica_processes

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
    from clients import PolicyClient
    from clients.observations import random_observation

    with PolicyClient("127.0.0.1", routes[0][0], timeout_ms=120_000) as c:
        embodiment = c.info()["embodiments"][POLICY]
    weights = zipf(len(routes), args.zipf)
    latencies: list[float] = []
    errors: list[str] = []
    per_rank = np.zeros(len(routes), dtype=int)
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def robot(i: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        obs = random_observation(embodiment, 1, rng=rng)
        clients: dict[tuple[int, str], PolicyClient] = {}
        try:
            while time.monotonic() < stop_at:
                rank = int(rng.choice(len(routes), p=weights))
                port, model = routes[rank]
                client = clients.get((port, model))
                if client is None:
                    client = clients[(port, model)] = PolicyClient("127.0.0.1", port, timeout_ms=120_000, model_id=model)
                t0 = time.perf_counter()
                try:
                    client.get_action(obs)
                except Exception as exc:  # counted and reported, the run goes on
                    with lock:
                        errors.append(f"{model}@{port}: {exc}"[:200])
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                    per_rank[rank] += 1
        finally:
            for c in clients.values():
                c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=robot, args=(i,), daemon=True) for i in range(args.robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 180)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "answers": len(latencies), "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.nanpercentile(lat, 50)), 2), "p99_ms": round(float(np.nanpercentile(lat, 99)), 2),
        "answers_by_rank": per_rank.tolist(),
    }


def status_pages(config: dict[str, Any]) -> list[dict[str, Any]]:
    port = config["http_options"]["port"]
    out = []
    for app in config["applications"]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{app['route_prefix']}", timeout=30) as r:
            out.append(json.loads(r.read()))
    return out


def rss_mb(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            pass
    return round(total, 1)


def measure(label: str, config: dict[str, Any], routes: list[tuple[int, str]], args, out_dir: Path, stamp: str) -> dict:
    runner = ServeRun(config, out_dir / f"multiplex-{stamp}-{label}.yaml", out_dir / f"multiplex-{stamp}-{label}.log")
    try:
        t0 = time.perf_counter()
        for port in sorted({p for p, _ in routes}):
            runner.wait_ready(f"127.0.0.1:{port}")
        log(f"  {label}: {len(config['applications'])} app(s) up in {time.perf_counter() - t0:.1f} s")
        drive(routes, args, args.warmup_s, seed=1)  # every fine-tune answered once where the Zipf tail allows
        before = status_pages(config)
        result = drive(routes, args, args.duration_s, seed=2)
        after = status_pages(config)

        def totals(pages):
            models = [m for page in pages for m in page.get("models", {}).values()]
            return sum(m["requests"] for m in models), sum(m["cold_load_requests"] for m in models)

        (n0, c0), (n1, c1) = totals(before), totals(after)
        result["cold_load_rate"] = round((c1 - c0) / max(1, n1 - n0), 4)
        pids = [pid for app in config["applications"]
                for dep, ps in replica_processes(app["name"]).items() if dep == POLICY for pid in ps]
        result["policy_replicas"] = len(pids)
        result["policy_rss_mb"] = rss_mb(pids)
        log(f"  {label}: {result['throughput_rps']} answers/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
            f"cold-load rate {result['cold_load_rate']:.1%}, {result['policy_replicas']} policy replicas using "
            f"{result['policy_rss_mb']} MB, {result['errors']} errors")
        return result
    finally:
        runner.stop()


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
    results: dict[str, Any] = {"machine": machine_info(args.device), "settings": vars(args),
                               "zipf_weights": [round(w, 4) for w in zipf(args.fine_tunes, args.zipf)], "layouts": {}}
    log(f"{args.fine_tunes} {args.preset} fine-tunes of {POLICY}, {args.robots} robots, Zipf s={args.zipf}, "
        f"{args.cores} cores, {args.device}")
    for name in args.layouts.split(","):
        config, routes = layouts[name](paths, args)
        results["layouts"][name] = measure(name, config, routes, args, RESULTS, stamp)
    out = RESULTS / f"multiplex-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
