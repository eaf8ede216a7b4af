"""Per-embodiment autoscaling, driven by ZMQ robots (no HTTP): 1 replica -> 2 under load -> 1 after it.

Robots' requests never pass Serve's HTTP proxy, and the ingress keeps the queue (the EDF scheduler sends one
batch per replica at a time), so Serve's ongoing-calls signal says little. The deployment scales with the
fleet's SLO policy (serving/autoscaling.py): the ingress reports the samples per second its robots ask for
and what one replica serves at full batches; replicas hand that report to Serve. Six closed-loop robots keep
one replica saturated (demand above 80% of one replica's capacity: two wanted); when they stop, one robot
trickling a few requests a second needs well under one replica, and the deployment goes back to
`min_replicas` after `downscale_delay_s`.

The config is small and fast on purpose (a 2-core CI machine): delays of seconds instead of the production
10 s / 300 s of cluster/serve_config.gpu.yaml, and `metrics_interval_s` (deprecated in Ray 2.60, still the
handle's push period to the controller) at 0.5 s instead of 10 s.
"""

from __future__ import annotations

import time

import pytest
from ray import serve

from clients import PolicyClient
from support.net import free_port
from support.serve_apps import deploy_config
from support.waiting import wait_for
from bench.robots import BackgroundFleet as RobotLoad
from serving.config import LOW_LATENCY_ENV_VARS

APP = "fleet-autoscale"
TAG = "gr1"

AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,
    # Serve's own policy (used only until replicas report demand) would never scale out at this target: a
    # scale-out below proves the SLO policy decided it.
    "target_ongoing_requests": 100,
    "policy": {"policy_function": "serving.autoscaling:slo_autoscaling_policy"},
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,  # how often the ingress's handle pushes its ongoing calls to the controller
}


def autoscaling_app(checkpoint, port: int) -> dict:
    args = {
        # Deadlines just below the robots' 20 s timeout: while a replica starts on this 2-core machine the
        # running one slows down for seconds, and the EDF scheduler would refuse what it predicts late.
        "ingress": {"ports": [{"port": port, "embodiment": TAG}], "max_inflight_batches": 4, "request_timeout_ms": 19_000},
        "embodiments": {TAG: {"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1}},
    }
    deployments = [
        {
            "name": TAG,
            "ray_actor_options": {"num_cpus": 0.2},
            "max_ongoing_requests": 16,
            # Small batches: the ingress keeps several batches in flight instead of one big one.
            "user_config": {"max_batch_size": 2, "batch_wait_ms": 1},
            "autoscaling_config": AUTOSCALING,
        },
        {"name": "ZmqIngress", "ray_actor_options": {"num_cpus": 0.1}},
    ]
    return {"name": APP, "route_prefix": None, "import_path": "serving.app:build_app", "args": args,
            "deployments": deployments, "runtime_env": {"env_vars": dict(LOW_LATENCY_ENV_VARS)}}


def replica_states() -> dict[str, int]:
    """gr1's replicas by state (RUNNING, STARTING, STOPPING, ...) as `serve status` reports them."""
    app = serve.status().applications.get(APP)
    if app is None or TAG not in app.deployments:
        return {}
    return {str(state): n for state, n in app.deployments[TAG].replica_states.items()}


class Timeline:
    """Replica-state changes with their time since the start, for the failure message and the report."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, dict[str, int]]] = []

    def poll(self) -> dict[str, int]:
        states = replica_states()
        if not self.events or self.events[-1][1] != states:
            self.events.append((round(time.monotonic() - self.t0, 1), states))
        return states

    def __str__(self) -> str:
        return "; ".join(f"{t}s {s}" for t, s in self.events)


@pytest.fixture(scope="module")
def autoscaled(ray_session, tiny_checkpoint):
    port = free_port()
    deploy_config([autoscaling_app(tiny_checkpoint, port)])
    with PolicyClient("127.0.0.1", port, timeout_ms=60_000) as c:
        info = c.info()
    yield port, info["embodiments"][TAG]
    serve.delete(APP)


def test_autoscaling_gr1_scales_out_under_robot_load_and_back_in_after(autoscaled):
    port, embodiment = autoscaled
    timeline = Timeline()
    assert timeline.poll() == {"RUNNING": 1}, f"expected to start at min_replicas=1: {timeline}"

    # 6 robots in a closed loop: the ingress keeps its 4 batch slots busy, the handle reports ~4 ongoing calls.
    load = RobotLoad([("127.0.0.1", port, TAG, embodiment)], robots=6, timeout_ms=20_000, max_seconds=150)
    trickle = RobotLoad([("127.0.0.1", port, TAG, embodiment)], robots=1, timeout_ms=20_000, max_seconds=150,
                        pause_s=0.2)
    with trickle, load:
        wait_for(lambda: timeline.poll().get("RUNNING", 0) >= 2, 90, f"gr1 to scale out to 2 replicas ({timeline})",
                 interval=0.25)
        scaled_out_at = time.monotonic() - timeline.t0
        # The new replica serves robots: each of two replicas answers a share of the actions.
        wait_for(lambda: sum(n >= 10 for n in load.snapshot()["replicas"].get(TAG, {}).values()) >= 2, 30,
                 f"robots to be answered by two replicas ({load.snapshot()['replicas']})", interval=0.25)
        load.stop()
        under_load = load.snapshot()
        # What the ingress's scheduler believed (forward-time model, overhead, replicas), for a failure message:
        # read now, before the scale-in changes it, and only when there is a failure to explain.
        believed = (serve.get_deployment_handle("ZmqIngress", APP).remote(None).result(timeout_s=30)["embodiments"][TAG]
                    if under_load["errors"] else None)
        # Only the trickle (1 robot, ~4 req/s) remains: ongoing calls well below target, so back to 1 replica.
        wait_for(lambda: timeline.poll() == {"RUNNING": 1}, 60, f"gr1 to scale back in to 1 replica ({timeline})",
                 interval=0.25)
        scaled_in_at = time.monotonic() - timeline.t0
        # The trickle keeps being answered after the scale-in, by the one replica left.
        at_scale_in = trickle.snapshot()["replicas"].get(TAG, {})
        wait_for(lambda: sum(trickle.snapshot()["replicas"].get(TAG, {}).values()) >= sum(at_scale_in.values()) + 3,
                 30, "actions after the scale-in")
    during = trickle.snapshot()
    since_scale_in = {r for r, n in during["replicas"][TAG].items() if n > at_scale_in.get(r, 0)}

    print(f"\nautoscaling timeline: {timeline}\n  scaled out at {scaled_out_at:.1f}s, back in at {scaled_in_at:.1f}s; "
          f"load: {under_load['answered']} actions by replica {under_load['replicas']}; trickle: {during['answered']}")
    assert not under_load["errors"], (f"robots got errors under load: {under_load['errors']} {load.error_log[:5]}; "
                                      f"the scheduler: {believed}")
    assert not during["errors"], f"the trickle robot got errors across scaling: {during['errors']} {trickle.error_log[:5]}"
    assert under_load["answered"].get(TAG, 0) > 20, under_load
    assert len(since_scale_in) == 1, f"after the scale-in, actions came from {since_scale_in}"
    assert since_scale_in <= set(under_load["replicas"][TAG]), "the replica left must be one that served the load"
