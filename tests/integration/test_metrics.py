"""The fleet's custom metrics reach Ray's Prometheus endpoint (`ray_fleetserve_*`) with the right values.

The ingress counts on its hot path and flushes to Ray's metrics every second (serving/metrics.py); Ray's
metrics agent then exports them on the node's metrics export port (the session Ray's is `metrics_port`) after
its own export delay. So the test sends a known set of requests, then polls /metrics until the counters reach
what was sent (with a deadline), and checks they do not overshoot.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from ray import serve

from clients import PolicyClient, PolicyServerError
from clients.observations import random_observation
from support.net import free_port
from support.serve_apps import deploy_config
from support.waiting import wait_for

APP = "fleet-metrics"
TOKEN = "metrics-test-token"
EXPORT_DEADLINE_S = 90  # the ingress flushes every 1 s; Ray's exporter adds its own delay (~5-10 s seen here)

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Ray's Prometheus text, parsed into (name, labels, value) samples."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return samples


def total(samples, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None when there is none."""
    values = [v for n, ls, v in samples if n == name and all(ls.get(k) == want for k, want in labels.items())]
    return sum(values) if values else None


@pytest.fixture(scope="module")
def metered(ray_session, tiny_checkpoint):
    """gr1 on an open port and on a port that wants a token (for unauthorized replies)."""
    open_port, token_port = free_port(), free_port()
    args = {
        "ingress": {"ports": [{"port": open_port, "embodiment": "gr1"},
                              {"port": token_port, "embodiment": "gr1", "api_token": TOKEN}]},
        "embodiments": {"gr1": {"checkpoint": str(tiny_checkpoint), "device": "cpu"}},
    }
    app = {"name": APP, "route_prefix": None, "import_path": "serving.app:build_app", "args": args,
           "deployments": [
               {"name": "gr1", "ray_actor_options": {"num_cpus": 0.2},
                "user_config": {"max_batch_size": 16, "batch_wait_ms": 20}},
               {"name": "ZmqIngress", "ray_actor_options": {"num_cpus": 0.1}},
           ]}
    deploy_config([app])
    with PolicyClient("127.0.0.1", open_port, timeout_ms=60_000) as c:
        info = c.info()
    yield open_port, token_port, info["embodiments"]["gr1"]
    serve.delete(APP)


def test_fleet_metrics_reach_rays_prometheus_endpoint(metered, metrics_port):
    open_port, token_port, gr1 = metered
    ok_sequential, ok_crowd, bad, unauthorized = 5, 6, 3, 2

    # A robot that stays connected for the whole test (robots_connected >= 1 on the open port).
    robot = PolicyClient("127.0.0.1", open_port, timeout_ms=60_000)
    try:
        for _ in range(ok_sequential):
            robot.get_action(random_observation(gr1, 1))
        # A crowd at once, so some requests share a forward pass (batch size > 1).
        barrier = threading.Barrier(ok_crowd)
        failures: list[BaseException] = []

        def crowd_robot() -> None:
            with PolicyClient("127.0.0.1", open_port, timeout_ms=60_000) as c:
                barrier.wait(timeout=30)
                try:
                    c.get_action(random_observation(gr1, 1))
                except BaseException as exc:  # noqa: BLE001 - asserted below
                    failures.append(exc)

        threads = [threading.Thread(target=crowd_robot) for _ in range(ok_crowd)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert not failures and not any(t.is_alive() for t in threads), failures
        # A deadline no forward pass can meet: refused at once, saying the predicted and the allowed time.
        with pytest.raises(PolicyServerError, match=r"deadline: refused early, predicted \d+ ms .* allows 1 ms") as err:
            robot.get_action(random_observation(gr1, 1), {"deadline_ms": 1})
        assert err.value.reason == "refused_early"
        for _ in range(bad):  # not an observation: bad_request, before any policy call
            with pytest.raises(PolicyServerError, match="observation"):
                robot.call_endpoint("get_action", {"observation": "not a map", "options": None})
        with PolicyClient("127.0.0.1", token_port, timeout_ms=60_000, api_token="wrong") as intruder:
            for _ in range(unauthorized):
                with pytest.raises(PolicyServerError, match="Unauthorized"):
                    intruder.call_endpoint("ping", requires_input=False)

        ok = ok_sequential + ok_crowd
        app = {"application": APP}

        def exported():
            s = scrape(metrics_port)
            got = {
                "ok": total(s, "ray_fleetserve_requests_total", embodiment="gr1", endpoint="get_action", outcome="ok", **app),
                "bad": total(s, "ray_fleetserve_requests_total", embodiment="gr1", endpoint="get_action",
                             outcome="bad_request", **app),
                "unauth": total(s, "ray_fleetserve_requests_total", embodiment="gr1", endpoint="ping",
                                outcome="unauthorized", **app),
                "err_bad": total(s, "ray_fleetserve_errors_total", embodiment="gr1", kind="bad_request", **app),
                "err_unauth": total(s, "ray_fleetserve_errors_total", embodiment="gr1", kind="unauthorized", **app),
                "batch_count": total(s, "ray_fleetserve_batch_size_count", embodiment="gr1", **app),
                "robots": total(s, "ray_fleetserve_robots_connected", port=str(open_port), **app),
                "on_time": total(s, "ray_fleetserve_slo_requests_total", embodiment="gr1", port=str(open_port),
                                 outcome="on_time", **app),
                "refused_early": total(s, "ray_fleetserve_slo_requests_total", embodiment="gr1", port=str(open_port),
                                       outcome="refused_early", **app),
            }
            done = (got["ok"] or 0) >= ok and (got["err_bad"] or 0) >= bad and (got["err_unauth"] or 0) >= unauthorized \
                and (got["batch_count"] or 0) >= ok and (got["robots"] or 0) >= 1 and (got["refused_early"] or 0) >= 1
            exported.last = got
            return (s, got) if done else None

        exported.last = {}
        sent_at = time.monotonic()
        try:
            samples, got = wait_for(exported, EXPORT_DEADLINE_S, "the fleet's metrics on Ray's /metrics", interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {exported.last}") from None
        print(f"\nfleet metrics exported {time.monotonic() - sent_at:.1f}s after the last request: {got}")
    finally:
        robot.close()

    # Exactly what was sent: nothing lost, nothing counted twice.
    assert got["ok"] == ok, got
    assert got["bad"] == bad and got["err_bad"] == bad, got
    assert got["unauth"] == unauthorized and got["err_unauth"] == unauthorized, got
    # Histograms: one observation per action, every bucket family present and consistent.
    labels = {"embodiment": "gr1", "application": APP}
    assert got["batch_count"] == ok, got
    batch_sum = total(samples, "ray_fleetserve_batch_size_sum", **labels)
    assert ok <= batch_sum <= ok * 16, batch_sum  # every action rode in a batch of 1 to max_batch_size
    assert total(samples, "ray_fleetserve_batch_size_bucket", le="+Inf", **labels) == ok
    for name in ("queue_ms", "infer_ms", "total_ms"):
        assert total(samples, f"ray_fleetserve_{name}_count", **labels) == ok, name
        assert total(samples, f"ray_fleetserve_{name}_sum", **labels) > 0, name
    assert total(samples, "ray_fleetserve_total_ms_sum", **labels) >= total(samples, "ray_fleetserve_infer_ms_sum", **labels)
    # SLO accounting: every action on time (the ingress never delivers one late), the hopeless one refused early,
    # and the scheduler's prediction beside each forward pass after the first reply taught it the curve.
    assert got["on_time"] == ok and got["refused_early"] == 1, got
    predicted = total(samples, "ray_fleetserve_predicted_infer_ms_count", **labels)
    assert 1 <= predicted <= ok, predicted
    assert total(samples, "ray_fleetserve_infer_prediction_ratio_count", **labels) == predicted
    # Gauges: the robot still connected, and the embodiment's (now empty) queue.
    assert got["robots"] >= 1, got
    assert total(samples, "ray_fleetserve_queue_depth", embodiment="gr1", **{"application": APP}) == 0, "queue left"
    # Serve's own labels ride along (the dashboard groups by them).
    names = {ls.get("deployment") for n, ls, _ in samples if n == "ray_fleetserve_requests_total" and ls.get("application") == APP}
    assert names == {"ZmqIngress"}, names
