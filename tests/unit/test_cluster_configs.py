"""The cluster deployment files (cluster/) stay valid and in step with the code, without Ray:

- every Serve config file validates with the project's typed args and carries the low-latency env vars;
- the GPU config puts one policy replica per GPU, autoscales each embodiment in reach, and pins the ingress;
- cluster/kuberay/rayservice.yaml is exactly what cluster/render_rayservice.py renders, embeds the Serve config
  and exposes exactly the ingress ports;
- the Grafana dashboard only uses metrics that serving/metrics.py declares.

The same files against the installed Ray's own code (Serve's schema, `ray up` checks, the KubeRay autoscaler's
reader, the metrics and CLI flags this Ray has): tests/integration/test_cluster_configs_ray.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config import BatchingConfig, FleetArgs
from support.cluster_files import (
    CLUSTER, GPU_CONFIG, INGRESS, MANIFEST, REPO, SERVE_CONFIGS, dashboard_exprs, declared_metrics,
    deployments_by_name, exported_names, fleet_apps, load_dashboard, load_yaml, manifest_docs, render_rayservice,
)


# ------------------------------------------------------------------------------------------------- Serve configs


def test_both_serve_configs_are_found():
    assert REPO / "serve_config.yaml" in SERVE_CONFIGS
    assert GPU_CONFIG in SERVE_CONFIGS


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_serve_configs_carry_the_low_latency_env_vars(path: Path):
    # Read when a replica's process starts, so only the config can set them (serving/config.py says why each).
    from serving.config import LOW_LATENCY_ENV_VARS

    for app in fleet_apps(load_yaml(path)):
        env = (app.get("runtime_env") or {}).get("env_vars") or {}
        assert {k: env.get(k) for k in LOW_LATENCY_ENV_VARS} == LOW_LATENCY_ENV_VARS, path.name


def test_gpu_config_gives_each_embodiment_a_gpu_and_its_own_autoscaling():
    cfg = load_yaml(GPU_CONFIG)
    (app,) = fleet_apps(cfg)
    args = FleetArgs.model_validate(app["args"])
    deployments = deployments_by_name(app)
    assert set(deployments) == set(args.embodiments) | {INGRESS}
    assert args.ingress.host == "0.0.0.0"
    for tag, emb in args.embodiments.items():
        d = deployments[tag]
        assert d["ray_actor_options"]["num_gpus"] == 1, tag
        assert d["ray_actor_options"]["num_cpus"] >= 1, tag
        assert "num_replicas" not in d, f"{tag}: num_replicas and autoscaling_config exclude each other"
        auto = d["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"], tag
        assert auto["target_ongoing_requests"] > 0, tag
        assert {"upscale_delay_s", "downscale_delay_s"} <= set(auto), tag
        assert BatchingConfig.model_validate(d["user_config"]).max_batch_size == 32, tag
        assert emb.device.startswith("cuda"), tag
        assert Path(args.checkpoint_root).is_absolute(), "checkpoint_root must name one path on every node"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_autoscaling_is_within_reach_of_the_ingress(path: Path):
    # Serve's autoscaler only sees batches that left the ingress: at most max_inflight_batches per embodiment and
    # ingress replica. Fewer than max_replicas x target and the deployment can never reach max_replicas.
    (app,) = fleet_apps(load_yaml(path))
    args = FleetArgs.model_validate(app["args"])
    deployments = deployments_by_name(app)
    ingresses = deployments[INGRESS].get("num_replicas", 1)
    for tag in args.embodiments:
        auto = deployments[tag].get("autoscaling_config")
        if not auto:
            continue
        visible = args.ingress.max_inflight_batches * ingresses
        assert visible >= auto["max_replicas"] * auto["target_ongoing_requests"], (
            f"{tag}: max_inflight_batches {args.ingress.max_inflight_batches} x {ingresses} ingress(es) < "
            f"max_replicas {auto['max_replicas']} x target_ongoing_requests {auto['target_ongoing_requests']}"
        )


def test_default_config_fits_a_two_core_machine_at_max_replicas():
    # `make serve` on a 2-core laptop (or CI box): every replica the autoscaler may start must still be placeable.
    (app,) = fleet_apps(load_yaml(REPO / "serve_config.yaml"))
    need = 0.0
    for d in app["deployments"]:
        auto = d.get("autoscaling_config") or {}
        need += float((d.get("ray_actor_options") or {}).get("num_cpus", 1)) * auto.get("max_replicas", d.get("num_replicas", 1))
    assert need <= 2.0, f"serve_config.yaml needs {need} CPUs at max replicas"


def test_gpu_config_pins_the_single_ingress_with_a_custom_resource():
    (app,) = fleet_apps(load_yaml(GPU_CONFIG))
    ingress = deployments_by_name(app)[INGRESS]
    assert ingress["num_replicas"] == 1
    assert ingress["ray_actor_options"]["resources"] == {render_rayservice.INGRESS_RESOURCE: 1}
    assert not ingress.get("max_surge_percent"), "a surge ingress would start before the old one frees its ports"
    # ...and both cluster definitions give exactly that resource to the head only.
    launcher = load_yaml(CLUSTER / "ray-cluster.yaml")
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"ingress": 1}
    assert all("ingress" not in t.get("resources", {}) for n, t in types.items() if n != launcher["head_node_type"])


# -------------------------------------------------------------------------------------------- Ray cluster launcher


def test_cluster_files_name_no_real_addresses():
    allowed = {"0.0.0.0", "127.0.0.1", "10.0.0.0", "172.16.0.0", "192.168.0.0"}
    for path in [CLUSTER / "ray-cluster.yaml", GPU_CONFIG, MANIFEST, CLUSTER / "README.md"]:
        found = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text(encoding="utf-8"))) - allowed
        assert not found, f"{path.name}: {sorted(found)}"


# ------------------------------------------------------------------------------------------------ KubeRay manifest


def test_committed_rayservice_is_the_rendered_one():
    rendered = render_rayservice.render(GPU_CONFIG)
    assert MANIFEST.read_text(encoding="utf-8") == rendered, (
        "cluster/kuberay/rayservice.yaml is stale: run `python cluster/render_rayservice.py`"
    )
    assert render_rayservice.render(GPU_CONFIG) == rendered  # deterministic


def test_rayservice_embeds_the_serve_config():
    rayservice, _ = manifest_docs()
    assert rayservice["apiVersion"] == "ray.io/v1"
    embedded_text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(embedded_text, str), "serveConfigV2 must be a YAML string, not a mapping"
    embedded, source = yaml.safe_load(embedded_text), load_yaml(GPU_CONFIG)
    assert embedded == source
    assert [a["name"] for a in embedded["applications"]] == [a["name"] for a in source["applications"]]
    for got, want in zip(embedded["applications"], source["applications"]):
        assert deployments_by_name(got) == deployments_by_name(want)
        FleetArgs.model_validate(got["args"])


def test_robots_service_exposes_exactly_the_ingress_ports_on_the_ingress_pod():
    rayservice, service = manifest_docs()
    (app,) = fleet_apps(load_yaml(GPU_CONFIG))
    want = sorted(p.port for p in FleetArgs.model_validate(app["args"]).ingress.ports)
    ports = service["spec"]["ports"]
    assert sorted(p["port"] for p in ports) == want
    assert all(p["targetPort"] == p["port"] and p["protocol"] == "TCP" for p in ports)
    assert len({p["name"] for p in ports}) == len(ports)
    assert service["spec"]["type"] in ("LoadBalancer", "NodePort")

    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    head_labels = {**head["template"]["metadata"]["labels"], "ray.io/node-type": "head"}  # KubeRay adds the latter
    selector = service["spec"]["selector"]
    assert selector.get("ray.io/node-type") == "head"
    assert selector.items() <= head_labels.items()
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:  # workers are never selected
        assert not selector.items() <= {**group["template"]["metadata"].get("labels", {}), "ray.io/node-type": "worker"}.items()
    container_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert set(want) <= container_ports


def test_renderer_refuses_configs_robots_could_not_reach(tmp_path: Path):
    with pytest.raises(render_rayservice.ConfigError, match="ingress.host"):
        render_rayservice.render(REPO / "serve_config.yaml")  # one-machine config: 127.0.0.1
    cfg = load_yaml(GPU_CONFIG)
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == INGRESS:
            d["ray_actor_options"].pop("resources")
    unpinned = tmp_path / "unpinned.yaml"
    unpinned.write_text(yaml.safe_dump(cfg))
    with pytest.raises(render_rayservice.ConfigError, match="custom resource"):
        render_rayservice.render(unpinned)


def test_renderer_options_change_what_they_say():
    text = render_rayservice.render(
        GPU_CONFIG, image="registry.example.com/other:1", gpu_workers=5, min_gpu_workers=1, service_type="NodePort",
    )
    rayservice, service = [d for d in yaml.safe_load_all(text) if d]
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (1, 5, 1)
    assert group["template"]["spec"]["containers"][0]["image"] == "registry.example.com/other:1"
    assert service["spec"]["type"] == "NodePort" and "loadBalancerSourceRanges" not in service["spec"]


@pytest.mark.parametrize("how", [["cluster/render_rayservice.py"], ["-m", "cluster.render_rayservice"]])
def test_renderer_runs_as_script_and_module(how: list[str]):
    out = subprocess.run(
        [sys.executable, *how, "--out", "-"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout == MANIFEST.read_text(encoding="utf-8")
    check = subprocess.run([sys.executable, *how, "--check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


# --------------------------------------------------------------------------------------------------------- Grafana


def test_dashboard_is_importable_grafana_json():
    d = load_dashboard()
    assert d["title"] and d["uid"] and 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["embodiment"]["type"] == "query" and "embodiment" in variables["embodiment"]["query"]["query"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    fleet_panels = [p for p in d["panels"] if p["type"] != "row" and "ray_fleetserve_" in json.dumps(p["targets"])]
    assert all('$embodiment' in json.dumps(p["targets"]) or "robots_connected" in json.dumps(p["targets"])
               for p in fleet_panels)


def test_dashboard_uses_exactly_the_declared_fleet_metrics():
    declared = declared_metrics((REPO / "serving" / "metrics.py").read_text(encoding="utf-8"), "fleetserve_")
    assert declared, "no metrics found in serving/metrics.py"
    exported = {series: name for name, kind in declared.items() for series in exported_names(kind, name)}
    used = {m for e in dashboard_exprs(load_dashboard()) for m in re.findall(r"\bray_fleetserve_[a-z0-9_]+", e)}
    unknown = used - set(exported)
    assert not unknown, f"dashboard uses undeclared metrics {sorted(unknown)}; serving/metrics.py has {sorted(declared)}"
    unused = set(declared) - {exported[m] for m in used}
    assert not unused, f"serving/metrics.py declares metrics the dashboard does not show: {sorted(unused)}"


# ---------------------------------------------------------------------------------------------------------- README


