"""The cluster deployment files against the installed Ray's own code, without starting a cluster: Serve's config
schema, the checks `ray up` runs, the KubeRay autoscaler's reading of the RayService, the metrics this Ray exports
and the flags its CLI has (the Ray-free checks: tests/unit/test_cluster_configs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from serving.config import BatchingConfig, FleetArgs
from support.cluster_files import (
    APP_IMPORT_PATH, CLUSTER, GPU_CONFIG, INGRESS, REPO, SERVE_CONFIGS, dashboard_exprs, declared_metrics,
    deployments_by_name, exported_names, fleet_apps, load_dashboard, load_yaml, manifest_docs, render_rayservice,
)


def test_ingress_name_matches_the_app():
    # serving.app builds on Ray Serve: importing it imports Ray.
    from serving.app import INGRESS_NAME

    assert INGRESS_NAME == INGRESS


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_serve_config_validates_with_ray_and_fleet_args(path: Path):
    from ray.serve.schema import ServeDeploySchema

    cfg = load_yaml(path)
    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` / `serve run` check first
    apps = fleet_apps(cfg)
    assert apps, f"{path.name}: no application imports {APP_IMPORT_PATH}"
    for app in apps:
        args = FleetArgs.model_validate(app["args"])  # what build_app will receive
        deployments = deployments_by_name(app)
        assert len(deployments) == len(app["deployments"]), "a deployment is listed twice"
        allowed = set(args.embodiments) | {INGRESS}
        unknown = set(deployments) - allowed
        assert not unknown, f"{path.name}: deployments {sorted(unknown)} are neither embodiment tags nor {INGRESS}"
        for name, d in deployments.items():
            if name != INGRESS and "user_config" in d:
                BatchingConfig.model_validate(d["user_config"])


def test_ray_cluster_config_passes_ray_up_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(CLUSTER / "ray-cluster.yaml")
    for key in (
        "cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type", "file_mounts",
        "setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
    ):
        assert key in raw, key
    config = prepare_config(raw)  # what `ray up` does before launching anything: defaults, then the schema
    validate_config(config)
    head = raw["head_node_type"]
    workers = {n: t for n, t in raw["available_node_types"].items() if n != head}
    assert workers, "no worker node type"
    low, high = render_rayservice.gpu_bounds(load_yaml(GPU_CONFIG))  # one GPU per worker instance
    assert sum(t["min_workers"] for t in workers.values()) >= low
    assert sum(t["max_workers"] for t in workers.values()) >= high
    assert raw["max_workers"] >= high

    head_start = " ".join(raw["head_start_ray_commands"])
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--metrics-export-port=" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start and "--metrics-export-port=" in worker_start
    assert any("make setup" in c or "pip install -e" in c for c in raw["setup_commands"])
    assert "." in raw["file_mounts"].values()


def test_rayservice_groups_as_rays_kuberay_autoscaler_reads_them():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    rayservice, _ = manifest_docs()
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
    ray_cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "fleetserve", "namespace": "default"},
              "spec": cluster}
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)  # validates against the cluster config schema too
    types = config["available_node_types"]
    head = types.pop("headgroup")
    assert head["resources"].get("ingress") == 1 and head["resources"].get("GPU", 0) == 0
    (worker,) = types.values()
    assert worker["resources"]["GPU"] == 1
    low, high = render_rayservice.gpu_bounds(load_yaml(GPU_CONFIG))
    assert (worker["min_workers"], worker["max_workers"]) == (low, high)
    (group,) = cluster["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (ingress,) = [d for d in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["deployments"]
                  if d["name"] == INGRESS]
    for resource, amount in ingress["ray_actor_options"]["resources"].items():
        assert head["resources"].get(resource, 0) >= amount


def test_dashboard_ray_metrics_exist_in_this_ray():
    import ray

    root = Path(ray.__file__).parent
    serve_declared: dict[str, str] = {}
    for path in (root / "serve").rglob("*.py"):
        serve_declared.update(declared_metrics(path.read_text(encoding="utf-8"), "serve_"))
    serve_series = {s for name, kind in serve_declared.items() for s in exported_names(kind, name)}
    reporter = (root / "dashboard" / "modules" / "reporter" / "reporter_agent.py").read_text(encoding="utf-8")
    exprs = dashboard_exprs(load_dashboard())
    used_serve = {m for e in exprs for m in re.findall(r"\bray_serve_[a-z0-9_]+", e)}
    assert used_serve, "the dashboard shows no Ray Serve metric"
    assert not used_serve - serve_series, f"not exported by Ray {ray.__version__}: {sorted(used_serve - serve_series)}"
    for node_metric in {m for e in exprs for m in re.findall(r"\bray_(node_[a-z0-9_]+)", e)}:
        assert f'"{node_metric}"' in reporter, f"ray_{node_metric} is not a node metric of Ray {ray.__version__}"


def _click_options(command) -> set[str]:
    return {"--help"} | {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}


def test_readme_and_launcher_use_flags_this_ray_has():
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    commands = {("ray", name): cmd for name, cmd in ray_cli.commands.items()}
    commands.update({("serve", name): cmd for name, cmd in serve_cli.commands.items()})
    texts = [(CLUSTER / "README.md").read_text(encoding="utf-8"), (CLUSTER / "ray-cluster.yaml").read_text(encoding="utf-8")]
    checked = 0
    for text in texts:
        text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        text = re.sub(r"\n\s{4,}(?=--)", " ", text)  # folded YAML (>-) command lines
        for tool, sub, rest in re.findall(r"\b(ray|serve) ([a-z-]+)\b([^`'\n]*)", text):
            if (tool, sub) not in commands:
                continue
            options = _click_options(commands[(tool, sub)])
            for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
                assert flag in options, f"`{tool} {sub}` has no option {flag}"
                checked += 1
    assert checked >= 8
