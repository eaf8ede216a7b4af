"""The cluster deployment files (cluster/) and how tests read them: paths, YAML, the KubeRay renderer loaded by
path, the Grafana dashboard's queries and the metric names Ray exports for a declared metric."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
GPU_CONFIG = CLUSTER / "serve_config.gpu.yaml"
MANIFEST = CLUSTER / "kuberay" / "rayservice.yaml"
DASHBOARD = CLUSTER / "grafana-dashboard.json"
SERVE_CONFIGS = sorted({*REPO.glob("serve_config*.yaml"), *CLUSTER.glob("serve_config*.yaml")})
INGRESS = "ZmqIngress"
APP_IMPORT_PATH = "serving.app:build_app"


def _load_renderer():
    # By path: cluster/ is not an installed package, and the tests must not depend on the working directory.
    spec = importlib.util.spec_from_file_location("fleet_render_rayservice", CLUSTER / "render_rayservice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_rayservice = _load_renderer()


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def fleet_apps(cfg: dict) -> list[dict]:
    return [a for a in cfg["applications"] if a.get("import_path") == APP_IMPORT_PATH]


def deployments_by_name(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments") or []}


def manifest_docs() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d is not None]
    assert [d["kind"] for d in docs] == ["RayService", "Service"]
    return docs[0], docs[1]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def exported_names(kind: str, name: str) -> set[str]:
    """The Prometheus series names Ray exports for one metric (prefix `ray_`; counters end in `_total`)."""
    full = f"ray_{name}"
    if kind == "Counter":
        return {full if full.endswith("_total") else f"{full}_total"}
    if kind == "Histogram":
        return {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
    return {full}


def declared_metrics(text: str, prefix: str) -> dict[str, str]:
    pattern = r"\b(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?[\"'](" + prefix + r"[a-z0-9_]+)[\"']"
    return {name: kind for kind, name in re.findall(pattern, text)}
