"""A fleet on a multi-node Ray cluster on one machine, then a policy node lost under load.

Run by tests/system/test_multinode.py in a subprocess (one `ray.init` per process: it cannot share the test
session's Ray), or by hand:

    .venv/bin/python tests/support/multinode_scenario.py [--checkpoint DIR] [--out result.json]

Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`: several raylets on this machine) stands in
for a GPU cluster, with custom resources standing in for GPUs:

    head    {"ingress": 1}  the ZMQ ingress (as cluster/serve_config.gpu.yaml pins it), Serve controller
    gpu_a1  {"gpu_a": 1}    gr1's replica asks {gpu_a: 0.1}: it lands on one of these two,
    gpu_a2  {"gpu_a": 1}    the other is the spare it is rescheduled on when its node goes
    gpu_b   {"gpu_b": 1}    unitree_g1's replica asks {gpu_b: 0.1}

Steps: deploy; find where every replica runs (Ray's state API, `ray.util.state.list_actors`, through the
head's dashboard, which is started for that); robots of both embodiments get actions; the node hosting gr1's
replica is killed (`Cluster.remove_node`, no graceful shutdown) while robots keep sending; the scenario
measures how long until gr1 answers again (from a replica on the spare node) and records every error robots
saw, by kind and embodiment. The result is one JSON object: on stdout after `SCENARIO_RESULT `, and in
`--out` when given. The cluster is shut down on every exit path (and Ray's reaper kills its processes if
this process is killed outright).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
# The repository first (clients, serving, policy), then tests/ (the support package); PYTHONPATH for the cluster's
# workers too, which import serving.app wherever the script was started from.
sys.path[:0] = [str(REPO), str(TESTS)]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from support.net import free_port  # noqa: E402  (after the path set-up above)
from support.serve_apps import app_entry  # noqa: E402
from support.waiting import wait_for  # noqa: E402

APP = "fleet-multinode"
DEPLOYMENTS = ("gr1", "unitree_g1", "ZmqIngress")
REQUEST_TIMEOUT_MS = 12_000  # the ingress's default request deadline, stated for the report
# GCS health checks of raylets: a node killed outright is declared dead after ~period x threshold.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def fleet_app(checkpoint: str, ports: dict[str, int]) -> dict:
    """The test fleet's app entry, each policy pinned to its stand-in GPU node, the ingress to the head."""
    gpu = {"gr1": "gpu_a", "unitree_g1": "gpu_b"}
    return app_entry(
        APP, checkpoint, ports,
        ingress={"request_timeout_ms": REQUEST_TIMEOUT_MS},
        embodiments={tag: {"torch_threads": 1} for tag in ports},
        deployments={
            **{tag: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2, "resources": {gpu[tag]: 0.1}},
                     "user_config": {"max_batch_size": 8, "batch_wait_ms": 2}} for tag in ports},
            "ZmqIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1, "resources": {"ingress": 1}}},
        },
    )


class Placement:
    """Where Serve's actors run: Ray's state API (list_actors, node_id) against this cluster's dashboard."""

    def __init__(self, dashboard: str, roles: dict[str, str]):
        self.dashboard = dashboard
        self.roles = roles  # node id (hex) -> role name
        self.method = "ray.util.state.list_actors(address=<head dashboard>), field node_id"

    def actors(self) -> dict[str, list[dict[str, str]]]:
        """{deployment: [{replica, node, role}]} of the app's ALIVE replicas."""
        from ray.util.state import list_actors

        out: dict[str, list[dict[str, str]]] = {}
        for a in list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000,
                             raise_on_missing_output=False):
            cls = a.class_name or ""
            if not cls.startswith(f"ServeReplica:{APP}:"):
                continue
            deployment = cls.rsplit(":", 1)[1]
            replica = (a.name or "").rsplit("#", 1)[-1]  # SERVE_REPLICA::<app>#<deployment>#<replica id>
            out.setdefault(deployment, []).append(
                {"replica": replica, "node": a.node_id, "role": self.roles.get(a.node_id, "unknown")}
            )
        return out

    def when(self, condition) -> dict[str, list[dict[str, str]]] | None:
        """The placement if `condition(placement)` holds, else None (for wait_for)."""
        placement = self.actors()
        return placement if condition(placement) else None


def run(checkpoint: str | None, system_config: dict[str, Any] | None = None) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from clients import PolicyClient
    from bench.robots import BackgroundFleet as RobotLoad

    result: dict[str, Any] = {"ok": False, "phases": {}}
    t0 = time.monotonic()

    def phase(name: str) -> None:
        result["phases"][name] = round(time.monotonic() - t0, 1)
        print(f"[multinode {time.monotonic() - t0:6.1f}s] {name}", file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="fleet-multinode-")
    cluster = None
    load = None
    try:
        if checkpoint is None:
            from policy import build_demo_checkpoint

            checkpoint = str(build_demo_checkpoint(Path(tmp.name) / "tiny", preset="tiny",
                                                   embodiments=("gr1", "unitree_g1")))
            phase("checkpoint built")
        dashboard_port = free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1, "resources": {"ingress": 1}, "include_dashboard": True,
                "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
                "_system_config": SYSTEM_CONFIG if system_config is None else system_config,
            },
        )
        nodes = {
            "gpu_a1": cluster.add_node(num_cpus=1, resources={"gpu_a": 1}),
            "gpu_a2": cluster.add_node(num_cpus=1, resources={"gpu_a": 1}),  # whichever gr1 is not on is the spare
            "gpu_b": cluster.add_node(num_cpus=1, resources={"gpu_b": 1}),
        }
        cluster.wait_for_nodes(timeout=60)
        roles = {cluster.head_node.node_id: "head", **{n.node_id: role for role, n in nodes.items()}}
        result["nodes"] = {role: node_id[:12] for node_id, role in roles.items()}
        phase("cluster up (head + 3 worker nodes)")

        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        placement = Placement(f"http://127.0.0.1:{dashboard_port}", roles)
        from ray.serve._private.api import serve_start
        from ray.serve.schema import ServeDeploySchema

        client = serve_start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location="HeadOnly")
        ports = {"gr1": free_port(), "unitree_g1": free_port()}
        client.deploy_apps(ServeDeploySchema.model_validate({"applications": [fleet_app(checkpoint, ports)]}),
                           _blocking=False)
        client._wait_for_application_running(APP, timeout_s=150)
        phase("application running")

        with PolicyClient("127.0.0.1", ports["gr1"], timeout_ms=60_000) as c:
            info = c.info()
        before = wait_for(lambda: placement.when(lambda p: all(len(p.get(d, [])) == 1 for d in DEPLOYMENTS)), 30,
                            "one ALIVE actor per deployment in the state API")
        result["placement_method"] = placement.method
        result["placement_before"] = before

        targets = [("127.0.0.1", ports[tag], tag, info["embodiments"][tag]) for tag in ("gr1", "unitree_g1")]
        load = RobotLoad(targets, robots=4, timeout_ms=30_000, max_seconds=150, pause_s=0.02).start()
        wait_for(lambda: all(load.snapshot()["answered"].get(t, 0) >= 5 for t in ports), 60,
                   "both embodiments to answer robots")
        phase("robots served by both embodiments")
        served_before = load.snapshot()

        # Kill the node that hosts gr1's replica, under load.
        victim_role = before["gr1"][0]["role"]
        old_replica = before["gr1"][0]["replica"]
        result["removed_node"] = victim_role
        removed_at = time.time()
        cluster.remove_node(nodes[victim_role], allow_graceful=False)
        removed_mono = time.monotonic()
        phase(f"removed node {victim_role} (gr1's replica {old_replica})")

        victim_id = nodes[victim_role].node_id
        recovery: list[tuple[float, str]] = []  # (seconds after the removal, what changed)
        seen: dict[str, Any] = {}

        def note(key: str, value: Any, text: str) -> None:
            if seen.get(key) != value:
                seen[key] = value
                recovery.append((round(time.monotonic() - removed_mono, 1), text))

        def new_gr1_answer():
            alive = next((n["Alive"] for n in ray.nodes() if n["NodeID"] == victim_id), None)
            note("node", alive, f"node {victim_role} alive={alive} (GCS)")
            app = serve.status().applications.get(APP)
            states = dict(app.deployments["gr1"].replica_states) if app and "gr1" in app.deployments else {}
            note("gr1", states, f"gr1 replicas {states}")
            snap = load.snapshot()
            errs = snap["errors_by_embodiment"].get("gr1", {})
            note("errors", errs, f"gr1 robot errors so far {errs}")
            fresh = {r for r in snap["replicas"].get("gr1", {}) if r != old_replica}
            if fresh and snap["last_ok"].get("gr1", 0) > removed_at:
                note("answer", True, f"first gr1 action from new replica {sorted(fresh)}")
                return fresh
            return None

        try:
            new_replicas = wait_for(new_gr1_answer, 90, "gr1 to answer again from a new replica")
        finally:
            result["recovery_timeline"] = recovery
        result["recovery_s"] = round(time.monotonic() - removed_mono, 1)
        phase("gr1 answers again")
        after_placement = wait_for(lambda: placement.when(lambda p: all(len(p.get(d, [])) == 1 for d in DEPLOYMENTS)),
                                     30, "gr1's new replica in the state API")
        result["placement_after"] = after_placement
        result["new_gr1_replicas"] = sorted(new_replicas)

        # A little more load on the recovered cluster: both embodiments keep answering.
        mark = load.snapshot()["answered"]
        wait_for(lambda: all(load.snapshot()["answered"].get(t, 0) >= mark.get(t, 0) + 5 for t in ports), 30,
                   "both embodiments to keep answering after recovery")
        load.stop()
        phase("load stopped")
        snap = load.snapshot()
        result.update(
            answered=snap["answered"],
            answered_before_removal=served_before["answered"],
            replicas_seen=snap["replicas"],
            errors=snap["errors"],
            errors_by_embodiment=snap["errors_by_embodiment"],
            error_samples=[(round(ts - removed_at, 1), tag, m) for ts, tag, m in load.error_log[:10]],
            ok=True,
        )
    except BaseException as exc:  # reported in the JSON; the cleanup below runs either way
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if load is not None:
            try:
                load.stop(join_timeout=40)
            except Exception as exc:  # noqa: BLE001
                result.setdefault("cleanup_errors", []).append(str(exc))
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001
            result.setdefault("cleanup_errors", []).append(f"ray.shutdown: {exc}")
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception as exc:  # noqa: BLE001
                result.setdefault("cleanup_errors", []).append(f"cluster.shutdown: {exc}")
        tmp.cleanup()
        result["phases"]["cleaned up"] = round(time.monotonic() - t0, 1)
    return result


def _terminated(signum, frame):
    # A SIGTERM (the test's timeout) unwinds through run()'s `finally`, so the cluster is shut down.
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a tiny demo checkpoint holding gr1 and unitree_g1 (built when omitted)")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--default-health-checks", action="store_true",
                        help="keep Ray's default node health checks (slower node-death detection), for comparison")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    signal.signal(signal.SIGTERM, _terminated)
    result = run(args.checkpoint, {} if args.default_health_checks else None)
    text = json.dumps(result, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print("SCENARIO_RESULT " + text, flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
