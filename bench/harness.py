"""What the benchmarks share: the served app as `make serve` starts it (`serve run` of serve_config.yaml with the
bench's substitutions) and its status page, the demo checkpoints they run, free ports, the machine's description,
the settling of autoscaling before a measurement, and the results files (JSON under bench/results/, each with the
machine, the commit and the command that produced it). The serial reference server is bench/serial_server.py.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from bench.fleet import run_fleet_sync
from bench.robots import fetch_info

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
SERVE_CONFIG = ROOT / "serve_config.yaml"
APP_PREFIX = "bench"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(msg, flush=True)


def machine_info(device: str) -> dict[str, Any]:
    import numpy
    import torch
    import zmq

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pyzmq": zmq.__version__,
        "device": device,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def ensure_checkpoint(preset: str) -> Path:
    """Demo checkpoint of `preset` holding both default embodiments, built once into bench/.cache."""
    from policy import ensure_demo_checkpoint

    path = CACHE / preset
    if not (path / "config.json").exists():
        log(f"building the {preset!r} demo checkpoint at {path} (once; reused by later runs)")
    return ensure_demo_checkpoint(path, preset, embodiments=("gr1", "unitree_g1"))


def results_header(module: str, argv: Sequence[str] | None, device: str) -> dict[str, Any]:
    """What every results file starts with: the command that produced it, when, and on what (machine, commit)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {"command": " ".join(["python -m", module, *args]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine_info(device)}


def write_results(name: str, stamp: str, results: dict[str, Any]) -> Path:
    """bench/results/<name>-<stamp>.json, and a copy as <name>-latest.json (what BENCHMARKS.md tables cite)."""
    missing = [k for k in ("command", "machine") if k not in results]
    if missing:  # a figure nobody can reproduce is not a result
        raise ValueError(f"results for {name!r} lack {missing}: start them from results_header()")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    (RESULTS / f"{name}-latest.json").write_text(path.read_text())
    return path


def status_page(url: str) -> dict[str, Any] | None:
    """The ingress's HTTP status page (forward-time model, counts, reply hops), None if it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError) as exc:
        log(f"  status page {url} unreadable: {exc}")
        return None


def bench_serve_config(checkpoint: Path, plan: Any) -> dict[str, Any]:
    """serve_config.yaml as `make serve` runs it, with only these substitutions: the bench checkpoint (both
    embodiments) instead of demo_preset, the device, torch_threads, free ports (ZMQ and HTTP), the app name,
    and (unless --keep-deadline) the ingress deadline lifted to the fleet's timeout; --replicas sets the driven
    embodiment's num_replicas; --gpu gives each policy deployment a share of the GPU."""
    import yaml

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config.setdefault("http_options", {})["port"] = free_port()
    config["http_options"]["host"] = "127.0.0.1"
    app = config["applications"][0]
    app["name"] = f"{APP_PREFIX}-{checkpoint.name}"
    app["route_prefix"] = f"/{app['name']}"
    args = app.setdefault("args", {})
    ingress = args.setdefault("ingress", {})
    ingress["host"] = "127.0.0.1"
    ingress["ports"] = [{"port": free_port(), "embodiment": p["embodiment"]} for p in ingress.get("ports", [])]
    if not plan.keep_deadline:
        # The ingress answers "deadline exceeded" past request_timeout_ms (12 s by default): load shedding, which
        # the serial reference does not do. Lifted to the fleet's own timeout so both answer every request.
        ingress["request_timeout_ms"] = plan.timeout_ms
    embodiments = args.get("embodiments", {})
    for emb in embodiments.values():
        emb.pop("demo_preset", None)
        emb["checkpoint"] = str(checkpoint)
        emb["device"] = plan.device
        if plan.torch_threads and getattr(plan, "served_threads", True):
            emb["torch_threads"] = plan.torch_threads
    for dep in app.get("deployments", []):
        if dep.get("name") in embodiments:
            if plan.gpu:
                # one GPU shared by the embodiments: one replica each (a second could never be placed)
                dep["ray_actor_options"] = {"num_cpus": 1, "num_gpus": round(1.0 / len(embodiments), 3)}
                dep.pop("autoscaling_config", None)
                dep["num_replicas"] = 1
            if dep["name"] == plan.embodiment and plan.replicas:
                dep.pop("autoscaling_config", None)
                dep["num_replicas"] = plan.replicas
    return config


def replica_pids(app_name: str) -> dict[str, int]:
    """A PID per deployment of `app_name` (process titles read `ray::ServeReplica:<app>:<deployment>`)."""
    return {deployment: pids[0] for deployment, pids in replica_processes(app_name).items()}


def replica_processes(app_name: str) -> dict[str, list[int]]:
    """PIDs of every Serve replica process of `app_name`, by deployment (starting replicas included)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        marker = f"ServeReplica:{app_name}:"
        if marker in cmd:
            deployment = cmd.split(marker, 1)[1].split()[0].split(".")[0]
            found.setdefault(deployment, []).append(int(entry.name))
    return {k: sorted(v) for k, v in found.items()}


def settle_replicas(plan: Any, targets: list, robots: int, app_name: str) -> dict[str, Any]:
    """Under autoscaling, drive `robots` until the driven deployment's replica count stops changing: every
    replica process answers, and as many did in the previous stretch. The measured window then sees the
    replicas this load gets, not the scale-up. Bounded by plan.settle_max_s."""
    from bench.fleet import run_fleet_sync

    start, previous, stretches = time.monotonic(), None, 0
    while True:
        report = run_fleet_sync(targets, robots, 6.0, warmup_s=0.0, timeout_ms=plan.timeout_ms, seed=1000 + stretches)
        stretches += 1
        answering = len(report.replicas)
        processes = len(replica_processes(app_name).get(plan.embodiment, []))
        elapsed = time.monotonic() - start
        if answering == processes == previous or elapsed > plan.settle_max_s:
            settled = answering == processes == previous
            log(f"      {'settled at' if settled else 'NOT settled, measuring with'} {answering} replica(s) answering "
                f"({processes} running) after {elapsed:.0f} s of load")
            return {"replicas": answering, "processes": processes, "settle_s": round(elapsed, 1), "settled": settled}
        previous = answering if answering == processes else None


class ServeRun:
    """`serve run <config>` in a subprocess, exactly as `make serve` starts the fleet (its own local Ray)."""

    def __init__(self, config: dict[str, Any], config_path: Path, log_path: Path):
        import yaml

        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = dict(os.environ)
        env.setdefault("RAY_SERVE_ENABLE_TASK_EVENTS", "0")  # as `make serve`
        env.setdefault("RAY_worker_niceness", "0")  # as `make serve`: the replicas are the node's workload
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        serve_cli = Path(sys.executable).parent / "serve"
        cmd = [str(serve_cli) if serve_cli.exists() else "serve", "run", str(config_path)]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.log_path = log_path

    def wait_ready(self, target: str, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`serve run` exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                fetch_info(target, timeout_ms=2000)
                return
            except (TimeoutError, RuntimeError):
                time.sleep(1.0)
        raise RuntimeError(f"the served app did not answer 'info' within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve run: shut Serve down, then its Ray instance
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        self._log.close()


def start_app(config: dict[str, Any], port: int, config_path: Path, log_path: Path, attempts: int = 3) -> ServeRun:
    """`serve run` of the app, ready to answer on `port`; retried: a busy machine can miss Ray's fixed 30 s node
    startup."""
    for attempt in range(1, attempts + 1):
        runner = ServeRun(config, config_path, log_path)
        try:
            runner.wait_ready(f"127.0.0.1:{port}")
            return runner
        except RuntimeError as exc:
            runner.stop()
            if attempt == attempts:
                raise
            log(f"  app did not start ({exc}); retrying ({attempt}/{attempts})")
    raise AssertionError("unreachable")
