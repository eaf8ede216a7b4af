"""Serve apps for integration and system tests: deployed from a config as `serve run serve_config.yaml` does,
on free 127.0.0.1 ports and tiny checkpoints. Ray and Serve are imported inside the functions, so importing
this module starts nothing."""

from __future__ import annotations

from serving.config import LOW_LATENCY_ENV_VARS  # pydantic only: imports neither ray nor torch
from support.net import free_port


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
