"""Render the KubeRay manifests of the fleet from a Serve config file.

    python cluster/render_rayservice.py                  # writes cluster/kuberay/rayservice.yaml
    python -m cluster.render_rayservice --out -          # to stdout
    python cluster/render_rayservice.py --image registry.example.com/fleetserve:0.1.0-gpu --gpu-workers 6
    python cluster/render_rayservice.py --check          # exit 1 when the committed file is stale

Two Kubernetes objects, one file (`kubectl apply -f cluster/kuberay/rayservice.yaml`):

1. A `RayService` (ray.io/v1): `spec.serveConfigV2` is the Serve config file as a YAML string, and
   `spec.rayClusterConfig` a CPU head group plus one GPU worker group (1 GPU per pod, one policy replica per GPU),
   autoscaled by the in-tree Ray autoscaler between the policies' min and max replicas.
2. A `Service` that exposes the ZMQ ingress ports (read from the Serve config) to robots.

Where the ingress runs, and why the Service selects the head pod: the head group advertises the custom Ray resource
`ingress: 1` and the Serve config's `ZmqIngress` asks for it (`ray_actor_options: {resources: {ingress: 1}}`), so
the ingress always runs on the head pod. The Service selects that pod with KubeRay's own `ray.io/node-type: head`
label plus a label of ours naming this RayService (several fleets can share a namespace). KubeRay's generated
`<name>-head-svc` / `<name>-serve-svc` cannot be reused: their ports are fixed (GCS, dashboard, HTTP 8000), while
robots speak plain TCP (ZMQ) to the ingress ports.

Pure Python + PyYAML: runs where Ray is not installed. Output is deterministic (same input, same bytes), so a test
re-renders it and compares it with the committed file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SERVE_CONFIG = REPO / "cluster" / "serve_config.gpu.yaml"
DEFAULT_OUT = REPO / "cluster" / "kuberay" / "rayservice.yaml"

RAY_VERSION = "2.60.0"  # the Ray of the image; KubeRay uses it to pick features. Keep it equal to the image's Ray.
# A placeholder: an image with Ray 2.60, CUDA torch and this project installed (cluster/README.md, "Image").
DEFAULT_IMAGE = "registry.example.com/fleetserve:0.1.0-gpu"
DEFAULT_NAME = "fleetserve"
APP_IMPORT_PATH = "serving.app:build_app"
INGRESS_DEPLOYMENT = "ZmqIngress"
INGRESS_RESOURCE = "ingress"  # the custom Ray resource that pins the ingress to the head
FLEET_LABEL = "fleetserve/rayservice"  # pod label of ours: which RayService a head pod belongs to
ANY_HOST = ("0.0.0.0", "::", "*")
# Robots usually sit on private networks: the LoadBalancer admits RFC 1918 sources only unless told otherwise.
DEFAULT_SOURCE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")

HEAD_CPU, HEAD_MEMORY = "8", "32Gi"  # GCS, Serve controller, dashboard, the ingress (msgpack decode), HTTP proxy
WORKER_CPU, WORKER_MEMORY = "6", "28Gi"  # one policy replica (num_cpus 2) + proxy; 3B demo build peaks ~14 GB RAM
METRICS_PORT = 8080  # KubeRay's default metrics port; Prometheus scrapes it on every pod


class ConfigError(ValueError):
    """The Serve config cannot be served behind the rendered Service; the message says what to change."""


# ----------------------------------------------------------------------------------------------- reading the config


def load_serve_config(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("applications"), list) or not cfg["applications"]:
        raise ConfigError(f"{path}: expected a Serve config with a non-empty `applications:` list")
    return cfg


def fleet_apps(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    apps = [a for a in cfg["applications"] if a.get("import_path") == APP_IMPORT_PATH]
    if not apps:
        raise ConfigError(f"no application with import_path {APP_IMPORT_PATH!r} in the Serve config")
    return apps


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    for d in app.get("deployments") or []:
        if d.get("name") == name:
            return d
    return {}


def ingress_ports(cfg: dict[str, Any]) -> list[int]:
    """The ZMQ ports robots connect to, in config order; checks that a Service can reach them."""
    ports: list[int] = []
    for app in fleet_apps(cfg):
        ingress = (app.get("args") or {}).get("ingress") or {}
        name = app.get("name", "?")
        host = ingress.get("host", "127.0.0.1")
        if host not in ANY_HOST:
            raise ConfigError(
                f"application {name!r}: ingress.host is {host!r}; a Kubernetes Service reaches the pod's own IP, "
                "so the ingress must listen on all interfaces: set ingress.host: 0.0.0.0"
            )
        listed = ingress.get("ports")
        if not listed:
            raise ConfigError(f"application {name!r}: list ingress.ports explicitly, the Service exposes exactly them")
        for p in listed:
            port = int(p["port"])
            if port in ports:
                raise ConfigError(f"port {port} is listed twice across applications")
            ports.append(port)
        options = _deployment(app, INGRESS_DEPLOYMENT).get("ray_actor_options") or {}
        if not (options.get("resources") or {}).get(INGRESS_RESOURCE):
            raise ConfigError(
                f"application {name!r}: deployment {INGRESS_DEPLOYMENT} must ask for the custom resource "
                f"{INGRESS_RESOURCE!r} (ray_actor_options: {{resources: {{{INGRESS_RESOURCE}: 1}}}}): the Service "
                "selects the head pod, and only that resource keeps the ingress there"
            )
    return ports


def gpu_bounds(cfg: dict[str, Any]) -> tuple[int, int]:
    """GPUs the policy replicas need at their minimum and at their maximum replica counts."""
    low = high = 0.0
    for app in fleet_apps(cfg):
        for d in app.get("deployments") or []:
            gpus = float((d.get("ray_actor_options") or {}).get("num_gpus") or 0)
            if gpus <= 0:
                continue
            auto = d.get("autoscaling_config")
            if auto:
                lo = int(auto.get("min_replicas", 1))
                hi = int(auto.get("max_replicas", 1))
            else:
                lo = hi = int(d.get("num_replicas", 1))
            low += gpus * lo
            high += gpus * hi
    return math.ceil(low), math.ceil(high)


# ------------------------------------------------------------------------------------------------- building objects


def _ray_resources_param(resources: dict[str, float]) -> str:
    # KubeRay's documented form for custom resources in rayStartParams: a JSON object wrapped in literal quotes,
    # e.g. '"{\"Custom1\": 1}"' (the backslashes are part of the string).
    return '"' + json.dumps(resources, sort_keys=True).replace('"', '\\"') + '"'


# Ray starts worker processes at niceness 15, below its own daemons; the replicas and the ingress are this
# node's workload (on a busy node a forward pass at 15 measured ~1.5 ms slower), so they run at 0.
_RAYLET_ENV = [{"name": "RAY_worker_niceness", "value": "0"}]


def _container_ports(zmq_ports: list[int]) -> list[dict[str, Any]]:
    fixed = [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000), ("metrics", METRICS_PORT)]
    return [{"containerPort": port, "name": name} for name, port in fixed] + [
        {"containerPort": p, "name": f"zmq-{p}", "protocol": "TCP"} for p in zmq_ports
    ]


def _shm() -> tuple[dict[str, Any], dict[str, Any]]:
    # Ray's object store lives in /dev/shm; the container default (64 MB) is far too small.
    return {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def rayservice(
    serve_config_text: str,
    zmq_ports: list[int],
    *,
    name: str,
    image: str,
    min_workers: int,
    max_workers: int,
) -> dict[str, Any]:
    mount, volume = _shm()
    head = {
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",
            "metrics-export-port": str(METRICS_PORT),
            "num-gpus": "0",
            "resources": _ray_resources_param({INGRESS_RESOURCE: 1}),
        },
        "template": {
            "metadata": {"labels": {FLEET_LABEL: name}},
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "ports": _container_ports(zmq_ports),
                        "resources": {
                            "limits": {"cpu": HEAD_CPU, "memory": HEAD_MEMORY},
                            "requests": {"cpu": HEAD_CPU, "memory": HEAD_MEMORY},
                        },
                        "env": _RAYLET_ENV,
                        "volumeMounts": [mount],
                    }
                ],
                "volumes": [volume],
            },
        },
    }
    gpu_limits = {"cpu": WORKER_CPU, "memory": WORKER_MEMORY, "nvidia.com/gpu": "1"}
    worker = {
        "groupName": "gpu",
        "replicas": min_workers,
        "minReplicas": min_workers,
        "maxReplicas": max_workers,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT), "num-gpus": "1"},
        "template": {
            "metadata": {"labels": {FLEET_LABEL: name}},
            "spec": {
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": image,
                        "ports": [{"containerPort": 8000, "name": "serve"}, {"containerPort": METRICS_PORT, "name": "metrics"}],
                        "resources": {"limits": dict(gpu_limits), "requests": dict(gpu_limits)},
                        "env": _RAYLET_ENV,
                        "volumeMounts": [mount],
                    }
                ],
                "volumes": [volume],
                # GPU node pools are commonly tainted so that only GPU pods land there.
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "fleetserve"}},
        "spec": {
            "serveConfigV2": serve_config_text,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    # Serve's downscale_delay_s removes replicas; this then removes the idle GPU pod.
                    "idleTimeoutSeconds": 120,
                },
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def robots_service(
    zmq_ports: list[int], *, name: str, service_type: str, source_ranges: list[str]
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": service_type,
        "selector": {"ray.io/node-type": "head", FLEET_LABEL: name},
        "ports": [{"name": f"zmq-{p}", "port": p, "targetPort": p, "protocol": "TCP"} for p in zmq_ports],
    }
    if service_type == "LoadBalancer" and source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"{name}-robots",
            "labels": {"app.kubernetes.io/name": "fleetserve", "app.kubernetes.io/component": "zmq-ingress"},
        },
        "spec": spec,
    }


# --------------------------------------------------------------------------------------------------------- output


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as `|` literals (serveConfigV2 stays readable), no folding, no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def _dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096, allow_unicode=False)


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.name


def render(
    serve_config: str | os.PathLike = DEFAULT_SERVE_CONFIG,
    *,
    image: str = DEFAULT_IMAGE,
    name: str = DEFAULT_NAME,
    gpu_workers: int | None = None,
    min_gpu_workers: int | None = None,
    service_type: str = "LoadBalancer",
    source_ranges: list[str] | tuple[str, ...] = DEFAULT_SOURCE_RANGES,
) -> str:
    """The manifest file's text: a RayService and the robots' Service, `---`-separated."""
    path = Path(serve_config)
    cfg = load_serve_config(path)
    ports = ingress_ports(cfg)
    low, high = gpu_bounds(cfg)
    max_workers = high if gpu_workers is None else gpu_workers
    min_workers = low if min_gpu_workers is None else min_gpu_workers
    if max_workers < 1 or min_workers < 0 or min_workers > max_workers:
        raise ConfigError(f"GPU workers: expected 0 <= min ({min_workers}) <= max ({max_workers}) and max >= 1")
    if service_type not in ("LoadBalancer", "NodePort"):
        raise ConfigError(f"--service-type: expected LoadBalancer or NodePort, got {service_type!r}")
    source = _display(path)
    serve_text = _dump(cfg)  # comments dropped, content kept: the test parses both and compares
    port_list = ", ".join(str(p) for p in ports)
    header = f"""\
# GENERATED by cluster/render_rayservice.py from {source}; do not edit by hand.
# Regenerate: python cluster/render_rayservice.py  (tests/unit/test_cluster_configs.py fails when it is stale)
# Apply:      kubectl apply -f cluster/kuberay/rayservice.yaml  (needs the KubeRay operator, v1.1 or newer)
#
# RayService {name}:
# - spec.serveConfigV2 is {source} (comments dropped; read them there).
# - spec.rayClusterConfig: one CPU head (Serve controller, dashboard, the ZMQ ingress) and a GPU worker group,
#   1 GPU per pod, {min_workers} to {max_workers} pods (the GPUs of the policies' min to max replicas), scaled by
#   the in-tree Ray autoscaler as Serve adds and removes policy replicas.
# - The head advertises the custom Ray resource `{INGRESS_RESOURCE}: 1` and ZmqIngress asks for it, so the
#   ingress always runs on the head pod: the pod the Service in the second document sends robots to.
# KubeRay also creates {name}-head-svc (dashboard 8265, metrics {METRICS_PORT}) and {name}-serve-svc
# (HTTP 8000, the /fleet status page): `kubectl port-forward svc/{name}-head-svc 8265` opens the dashboard.
"""
    service_doc = f"""\
# Robots connect here: tcp://<EXTERNAL-IP of `kubectl get svc {name}-robots`>:<port>, ports {port_list}
# (each port's default embodiment is in ingress.ports of {source}).
# Selector: KubeRay's head-pod label plus ours naming this RayService: the pod where ZmqIngress runs.
# While KubeRay upgrades the RayCluster (a change to rayClusterConfig), the old and new head pods both match, so
# new connections may land on either until the old one is deleted; robots then reconnect to the new head.
# type: LoadBalancer admits loadBalancerSourceRanges only (private networks by default, `--source-ranges`);
# cloud-specific annotations (e.g. an internal or NLB load balancer) go under metadata.annotations.
# NodePort instead (`--service-type NodePort`): robots connect to <any node IP>:<nodePort of each port>.
# A ZMQ REQ robot keeps one TCP connection, so balancing (and a pod change) happens per connection only.
"""
    docs = [
        header + "---\n" + _dump(
            rayservice(serve_text, ports, name=name, image=image, min_workers=min_workers, max_workers=max_workers)
        ),
        service_doc + "---\n" + _dump(
            robots_service(ports, name=name, service_type=service_type, source_ranges=list(source_ranges))
        ),
    ]
    return "".join(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python cluster/render_rayservice.py",
        description="Render the KubeRay RayService (+ robots' Service) of the fleet from a Serve config file.",
    )
    parser.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG), help="Serve config file (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output file, - for stdout (default: %(default)s)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image with Ray, CUDA torch and fleetserve (default: %(default)s)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="RayService name (default: %(default)s)")
    parser.add_argument(
        "--gpu-workers", type=int, default=None,
        help="most GPU worker pods (default: GPUs the policies need at max_replicas)",
    )
    parser.add_argument(
        "--min-gpu-workers", type=int, default=None,
        help="fewest GPU worker pods (default: GPUs the policies need at min_replicas)",
    )
    parser.add_argument("--service-type", default="LoadBalancer", choices=("LoadBalancer", "NodePort"))
    parser.add_argument(
        "--source-ranges", default=",".join(DEFAULT_SOURCE_RANGES),
        help="comma-separated CIDRs allowed through the LoadBalancer, empty for any (default: %(default)s)",
    )
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from the rendering")
    args = parser.parse_args(argv)
    try:
        text = render(
            args.serve_config,
            image=args.image,
            name=args.name,
            gpu_workers=args.gpu_workers,
            min_gpu_workers=args.min_gpu_workers,
            service_type=args.service_type,
            source_ranges=[s.strip() for s in args.source_ranges.split(",") if s.strip()],
        )
    except ConfigError as exc:
        print(f"render_rayservice: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = Path(args.out).read_text(encoding="utf-8") if Path(args.out).exists() else None
        if current != text:
            print(f"render_rayservice: {args.out} is stale; run: python cluster/render_rayservice.py", file=sys.stderr)
            return 1
        return 0
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
