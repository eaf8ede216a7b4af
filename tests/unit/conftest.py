"""The unit layer starts no Ray and imports none, but for the modules listed below: it must stay seconds long and
free of Ray's start-up. Checked here rather than trusted:

- a unit test that asks for the session Ray (`ray_session`, `metrics_port`) is a collection error;
- a unit test module that imports `ray` (at import or while a test runs) fails, unless it is listed below with
  the reason; only seen when the unit layer runs alone (`make test-unit`, `pytest tests/unit`), since in a
  whole-suite run the integration layer has imported Ray before;
- a unit test after which Ray is running (ray.init, serve.run, ...) fails, in any run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent
RAY_FIXTURES = {"ray_session", "metrics_port"}

# Code under test that is built on Ray's API, so importing it imports Ray (it starts nothing):
RAY_IMPORT_ALLOWED = {
    "test_routing.py": "serving.routing subclasses Ray Serve's RequestRouter",
    "test_scheduler.py": "serving.scheduler retries a batch on Ray's actor errors (ray.exceptions)",
}


def _ours(path) -> Path | None:
    path = Path(str(path)).resolve()
    return path if UNIT in path.parents else None


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def pytest_collection_modifyitems(config, items):
    wanting = [item.nodeid for item in items if _ours(item.path) and RAY_FIXTURES & set(item.fixturenames)]
    if wanting:
        raise pytest.UsageError(f"unit tests may not use the session Ray ({sorted(RAY_FIXTURES)}): {wanting}")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    path = _ours(getattr(collector, "path", "")) if isinstance(collector, pytest.Module) else None
    had_ray = "ray" in sys.modules
    report = yield
    if path and not had_ray and "ray" in sys.modules and path.name not in RAY_IMPORT_ALLOWED and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"{path.name} imported ray: unit tests must not (move the test to tests/integration, or "
                           f"list the module in RAY_IMPORT_ALLOWED of {Path(__file__).name} with the reason)")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    path = _ours(item.path)
    had_ray, was_running = "ray" in sys.modules, _ray_running()
    result = yield
    if path and not was_running and _ray_running():
        raise AssertionError(f"{item.nodeid} started Ray: unit tests must not (tests/integration has the session Ray)")
    if path and not had_ray and "ray" in sys.modules and path.name not in RAY_IMPORT_ALLOWED:
        raise AssertionError(f"{item.nodeid} imported ray: unit tests must not (see {Path(__file__).name})")
    return result
