"""Shared fixtures. One Ray instance for the whole session (CI has 2 cores): every Serve test reuses it."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import pytest

from serving.config import LOW_LATENCY_ENV_VARS  # pydantic only: imports neither ray nor torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# Ports the session Ray was started with (filled in by `ray_session`).
_RAY_PORTS: dict[str, int] = {}


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray import serve

    # A known Prometheus export port, so tests can read the fleet's metrics (the `metrics_port` fixture);
    # the metrics agent runs without the dashboard too.
    _RAY_PORTS["metrics"] = free_port()
    # address="local": always a fresh Ray of our own, never one that happens to run on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=_RAY_PORTS["metrics"])
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_port(ray_session) -> int:
    """Ray's Prometheus endpoint of the session Ray: http://127.0.0.1:<metrics_port>/metrics."""
    return _RAY_PORTS["metrics"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A `tiny` demo checkpoint holding gr1 and unitree_g1, built offline once per session."""
    from policy import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", embodiments=("gr1", "unitree_g1"))


def deploy_config(applications: list[dict], timeout_s: int = 300) -> None:
    """Deploy apps from a config, as `serve run serve_config.yaml` does (and unlike `serve.run(app)`, which
    gives every call a new code version): a change of only user_config then reconfigures replicas live.
    Uses the same private calls as Ray's own `serve run` CLI, because Serve has no public Python API for it."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    client = serve_start(http_options={"host": "127.0.0.1", "port": free_port()})
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": applications}), _blocking=False)
    for app in applications:
        client._wait_for_application_running(app["name"], timeout_s=timeout_s)


def fleet_app(checkpoint, ports: dict[str, int], max_batch_size: int = 16, name: str = "fleet-test") -> dict:
    """The application entry of a serve config, like serve_config.yaml's, on free ports and tiny checkpoints."""
    args = {
        "ingress": {"ports": [{"port": p, "embodiment": tag} for tag, p in ports.items()]},
        "embodiments": {tag: {"checkpoint": str(checkpoint), "device": "cpu"} for tag in ports},
    }
    deployments = [
        {"name": tag, "ray_actor_options": {"num_cpus": 0.2},
         "user_config": {"max_batch_size": max_batch_size, "batch_wait_ms": 5}}
        for tag in ports
    ]
    deployments.append({"name": "ZmqIngress", "ray_actor_options": {"num_cpus": 0.1}})
    return {"name": name, "route_prefix": None, "import_path": "serving.app:build_app", "args": args,
            "deployments": deployments, "runtime_env": {"env_vars": dict(LOW_LATENCY_ENV_VARS)}}


def app_entry(name: str, checkpoint, ports: dict[str, int], *, ingress: dict | None = None,
              embodiments: dict[str, dict] | None = None, deployments: dict[str, dict] | None = None) -> dict:
    """`fleet_app` under another app name, with fields of `args.ingress`, of
    `args.embodiments.<tag>` and of the deployment entries (by name: a tag or "ZmqIngress") added or replaced."""
    app = fleet_app(checkpoint, ports, name=name)
    app["args"]["ingress"].update(ingress or {})
    for tag, extra in (embodiments or {}).items():
        app["args"]["embodiments"][tag].update(extra)
    for entry in app["deployments"]:
        entry.update((deployments or {}).get(entry["name"], {}))
    return app


def ingress_status(app: str, timeout_s: float = 30) -> dict:
    """The ingress's status page (the JSON its HTTP route serves: open_requests, robots_connected, rss_mb, ...),
    read through the app's handle so no HTTP port needs to be known."""
    from ray import serve

    return serve.get_app_handle(app).remote(None).result(timeout_s=timeout_s)
