"""Shared fixtures, and the layer markers. One Ray instance for the whole session (CI has 2 cores): every Serve
test reuses it. Plain helpers live in the `support` package (tests/support), not here: nothing imports conftest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.net import free_port

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "system")


def _layer(item) -> str | None:
    path = Path(str(item.path)).resolve()
    if TESTS not in path.parents:
        return None  # not one of ours (a path given on the command line outside tests/)
    parts = path.relative_to(TESTS).parts
    return parts[0] if len(parts) > 1 and parts[0] in LAYERS else ""


def pytest_collection_modifyitems(config, items):
    """Mark every test with its layer, from the folder it lives in (tests/<layer>/...): `-m unit` and the make
    targets select by it. A test outside the three folders is an error, so no test escapes every layer. A whole
    run goes unit, integration, system (not the folders' alphabetical order): the fast layer fails first."""
    stray = []
    for item in items:
        layer = _layer(item)
        if layer:
            item.add_marker(getattr(pytest.mark, layer))
        elif layer == "":
            stray.append(item.nodeid)
    if stray:
        raise pytest.UsageError(f"tests outside tests/{{{','.join(LAYERS)}}}/: {stray[:5]}")
    # A stable sort: each module's tests stay together and in order (module-scoped apps are built once).
    items.sort(key=lambda item: LAYERS.index(_layer(item)) if _layer(item) else len(LAYERS))


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
