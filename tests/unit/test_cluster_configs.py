"""The cluster deployment files (cluster/) stay valid and in step with the code, without starting any Ray cluster.

- every Serve config file validates with Ray's own schema and with the project's typed args (FleetArgs);
- the GPU config puts one policy replica per GPU, autoscales each embodiment in reach, and pins the ingress;
- cluster/ray-cluster.yaml passes the checks `ray up` runs;
- cluster/kuberay/rayservice.yaml is exactly what cluster/render_rayservice.py renders, embeds the Serve config,
  exposes exactly the ingress ports, and sizes its groups the way Ray's KubeRay autoscaler reads them;
- the Grafana dashboard only uses metrics that serving/metrics.py declares or that this Ray exports;
- the CLI flags in cluster/README.md exist in the installed Ray.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config import BatchingConfig, FleetArgs

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


def _yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _fleet_apps(cfg: dict) -> list[dict]:
    return [a for a in cfg["applications"] if a.get("import_path") == APP_IMPORT_PATH]


def _deployments(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments") or []}


def _manifest_docs() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d is not None]
    assert [d["kind"] for d in docs] == ["RayService", "Service"]
    return docs[0], docs[1]


# ------------------------------------------------------------------------------------------------- Serve configs


def test_both_serve_configs_are_found():
    assert REPO / "serve_config.yaml" in SERVE_CONFIGS
    assert GPU_CONFIG in SERVE_CONFIGS


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_serve_config_validates_with_ray_and_fleet_args(path: Path):
    from ray.serve.schema import ServeDeploySchema

    cfg = _yaml(path)
    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` / `serve run` check first
    apps = _fleet_apps(cfg)
    assert apps, f"{path.name}: no application imports {APP_IMPORT_PATH}"
    for app in apps:
        args = FleetArgs.model_validate(app["args"])  # what build_app will receive
        deployments = _deployments(app)
        assert len(deployments) == len(app["deployments"]), "a deployment is listed twice"
        allowed = set(args.embodiments) | {INGRESS}
        unknown = set(deployments) - allowed
        assert not unknown, f"{path.name}: deployments {sorted(unknown)} are neither embodiment tags nor {INGRESS}"
        for name, d in deployments.items():
            if name != INGRESS and "user_config" in d:
                BatchingConfig.model_validate(d["user_config"])


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_serve_configs_carry_the_low_latency_env_vars(path: Path):
    # Read when a replica's process starts, so only the config can set them (serving/config.py says why each).
    from serving.config import LOW_LATENCY_ENV_VARS

    for app in _fleet_apps(_yaml(path)):
        env = (app.get("runtime_env") or {}).get("env_vars") or {}
        assert {k: env.get(k) for k in LOW_LATENCY_ENV_VARS} == LOW_LATENCY_ENV_VARS, path.name


def test_ingress_name_matches_the_app():
    from serving.app import INGRESS_NAME

    assert INGRESS_NAME == INGRESS


def test_gpu_config_gives_each_embodiment_a_gpu_and_its_own_autoscaling():
    cfg = _yaml(GPU_CONFIG)
    (app,) = _fleet_apps(cfg)
    args = FleetArgs.model_validate(app["args"])
    deployments = _deployments(app)
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
    (app,) = _fleet_apps(_yaml(path))
    args = FleetArgs.model_validate(app["args"])
    deployments = _deployments(app)
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
    (app,) = _fleet_apps(_yaml(REPO / "serve_config.yaml"))
    need = 0.0
    for d in app["deployments"]:
        auto = d.get("autoscaling_config") or {}
        need += float((d.get("ray_actor_options") or {}).get("num_cpus", 1)) * auto.get("max_replicas", d.get("num_replicas", 1))
    assert need <= 2.0, f"serve_config.yaml needs {need} CPUs at max replicas"


def test_gpu_config_pins_the_single_ingress_with_a_custom_resource():
    (app,) = _fleet_apps(_yaml(GPU_CONFIG))
    ingress = _deployments(app)[INGRESS]
    assert ingress["num_replicas"] == 1
    assert ingress["ray_actor_options"]["resources"] == {render_rayservice.INGRESS_RESOURCE: 1}
    assert not ingress.get("max_surge_percent"), "a surge ingress would start before the old one frees its ports"
    # ...and both cluster definitions give exactly that resource to the head only.
    launcher = _yaml(CLUSTER / "ray-cluster.yaml")
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"ingress": 1}
    assert all("ingress" not in t.get("resources", {}) for n, t in types.items() if n != launcher["head_node_type"])


# -------------------------------------------------------------------------------------------- Ray cluster launcher


def test_ray_cluster_config_passes_ray_up_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(CLUSTER / "ray-cluster.yaml")
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
    low, high = render_rayservice.gpu_bounds(_yaml(GPU_CONFIG))  # one GPU per worker instance
    assert sum(t["min_workers"] for t in workers.values()) >= low
    assert sum(t["max_workers"] for t in workers.values()) >= high
    assert raw["max_workers"] >= high

    head_start = " ".join(raw["head_start_ray_commands"])
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--metrics-export-port=" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start and "--metrics-export-port=" in worker_start
    assert any("make setup" in c or "pip install -e" in c for c in raw["setup_commands"])
    assert "." in raw["file_mounts"].values()


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
    rayservice, _ = _manifest_docs()
    assert rayservice["apiVersion"] == "ray.io/v1"
    embedded_text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(embedded_text, str), "serveConfigV2 must be a YAML string, not a mapping"
    embedded, source = yaml.safe_load(embedded_text), _yaml(GPU_CONFIG)
    assert embedded == source
    assert [a["name"] for a in embedded["applications"]] == [a["name"] for a in source["applications"]]
    for got, want in zip(embedded["applications"], source["applications"]):
        assert _deployments(got) == _deployments(want)
        FleetArgs.model_validate(got["args"])


def test_robots_service_exposes_exactly_the_ingress_ports_on_the_ingress_pod():
    rayservice, service = _manifest_docs()
    (app,) = _fleet_apps(_yaml(GPU_CONFIG))
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


def test_rayservice_groups_as_rays_kuberay_autoscaler_reads_them():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    rayservice, _ = _manifest_docs()
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
    low, high = render_rayservice.gpu_bounds(_yaml(GPU_CONFIG))
    assert (worker["min_workers"], worker["max_workers"]) == (low, high)
    (group,) = cluster["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (ingress,) = [d for d in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["deployments"]
                  if d["name"] == INGRESS]
    for resource, amount in ingress["ray_actor_options"]["resources"].items():
        assert head["resources"].get(resource, 0) >= amount


def test_renderer_refuses_configs_robots_could_not_reach(tmp_path: Path):
    with pytest.raises(render_rayservice.ConfigError, match="ingress.host"):
        render_rayservice.render(REPO / "serve_config.yaml")  # one-machine config: 127.0.0.1
    cfg = _yaml(GPU_CONFIG)
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


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def _exported_names(kind: str, name: str) -> set[str]:
    """The Prometheus series names Ray exports for one metric (prefix `ray_`; counters end in `_total`)."""
    full = f"ray_{name}"
    if kind == "Counter":
        return {full if full.endswith("_total") else f"{full}_total"}
    if kind == "Histogram":
        return {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
    return {full}


def _declared(text: str, prefix: str) -> dict[str, str]:
    pattern = r"\b(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?[\"'](" + prefix + r"[a-z0-9_]+)[\"']"
    return {name: kind for kind, name in re.findall(pattern, text)}


def test_dashboard_is_importable_grafana_json():
    d = _dashboard()
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
    declared = _declared((REPO / "serving" / "metrics.py").read_text(encoding="utf-8"), "fleetserve_")
    assert declared, "no metrics found in serving/metrics.py"
    exported = {series: name for name, kind in declared.items() for series in _exported_names(kind, name)}
    used = {m for e in _exprs(_dashboard()) for m in re.findall(r"\bray_fleetserve_[a-z0-9_]+", e)}
    unknown = used - set(exported)
    assert not unknown, f"dashboard uses undeclared metrics {sorted(unknown)}; serving/metrics.py has {sorted(declared)}"
    unused = set(declared) - {exported[m] for m in used}
    assert not unused, f"serving/metrics.py declares metrics the dashboard does not show: {sorted(unused)}"


def test_dashboard_ray_metrics_exist_in_this_ray():
    import ray

    root = Path(ray.__file__).parent
    serve_declared: dict[str, str] = {}
    for path in (root / "serve").rglob("*.py"):
        serve_declared.update(_declared(path.read_text(encoding="utf-8"), "serve_"))
    serve_series = {s for name, kind in serve_declared.items() for s in _exported_names(kind, name)}
    reporter = (root / "dashboard" / "modules" / "reporter" / "reporter_agent.py").read_text(encoding="utf-8")
    exprs = _exprs(_dashboard())
    used_serve = {m for e in exprs for m in re.findall(r"\bray_serve_[a-z0-9_]+", e)}
    assert used_serve, "the dashboard shows no Ray Serve metric"
    assert not used_serve - serve_series, f"not exported by Ray {ray.__version__}: {sorted(used_serve - serve_series)}"
    for node_metric in {m for e in exprs for m in re.findall(r"\bray_(node_[a-z0-9_]+)", e)}:
        assert f'"{node_metric}"' in reporter, f"ray_{node_metric} is not a node metric of Ray {ray.__version__}"


# ---------------------------------------------------------------------------------------------------------- README


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
