"""Shared fixtures. One Ray instance for the whole session (CI has 2 cores): every Serve test reuses it."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import pytest

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


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A demo checkpoint (preset tiny, embodiments gr1 and unitree_g1, seed 0) built once per session, offline."""
    from policy.make_demo_checkpoint import build_demo_checkpoint

    path = build_demo_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny", "tiny", ("gr1", "unitree_g1"), seed=0)
    return str(path)


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
