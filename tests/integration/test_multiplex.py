"""Many fine-tunes of one embodiment on a shared replica: the real Serve app, real ZMQ, real tiny models.

One app, one gr1 replica keeping at most 2 fine-tunes loaded, fine-tunes built offline from distinct seeds.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ray import serve

from clients import PolicyClient, PolicyServerError
from clients.observations import random_observation
from support.net import free_port
from support.serve_apps import app_entry, deploy_config, ingress_status
from support.waiting import wait_for
from serving import demo_checkpoints
from serving.config import FleetArgs

APP = "multiplex-test"
FINE_TUNES = {"ft1": 1, "ft2": 2, "ft3": 3}  # name -> demo seed
SEED = {"seed": 11}  # the request's noise seed: the same action wherever and with whomever it is computed


def build_fine_tune(root: Path, seed: int) -> Path:
    from policy import build_demo_checkpoint

    return build_demo_checkpoint(root / f"tiny-gr1-seed{seed}", preset="tiny", embodiments=("gr1",), seed=seed)


@dataclass
class Fleet:
    app: dict
    port: int
    ft2_port: int  # a second gr1 port whose default model is ft2
    root: Path
    info: dict
    expected: dict[str, dict]  # model -> the action its checkpoint gives in-process for `obs`
    obs: dict

    def client(self, **kw) -> PolicyClient:
        return PolicyClient("127.0.0.1", self.port, timeout_ms=120_000, **kw)

    def resident(self) -> list[str]:
        with self.client() as c:
            models = c.info()["embodiments"]["gr1"]["models"]
        return sorted(name for name, m in models.items() if m["replicas"])


def in_process_actions(paths: dict[str, Path], obs: dict) -> dict[str, dict]:
    from policy import load_policy

    return {name: load_policy(str(p), "gr1", device="cpu").get_action(obs, dict(SEED))[0] for name, p in paths.items()}


@pytest.fixture(scope="module")
def fleet(ray_session, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetunes")
    paths = {name: build_fine_tune(root, seed) for name, seed in FINE_TUNES.items()}
    broken = root / "broken"
    shutil.copytree(paths["ft1"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    port = free_port()
    models = {name: {"checkpoint": str(p)} for name, p in paths.items()} | {"broken": {"checkpoint": str(broken)}}
    app = app_entry(APP, tiny_checkpoint, {"gr1": port},
                    embodiments={"gr1": {"models": models, "max_models_per_replica": 2}},
                    deployments={"gr1": {"num_replicas": 1}})
    app["args"]["checkpoint_root"] = str(root)
    ft2_port = free_port()
    app["args"]["ingress"]["ports"].append({"port": ft2_port, "embodiment": "gr1", "model": "ft2"})
    deploy_config([app])
    with PolicyClient("127.0.0.1", port, timeout_ms=120_000) as c:
        info = c.info()
    obs = random_observation(info["embodiments"]["gr1"], 1, rng=np.random.default_rng(3))
    expected = in_process_actions({"default": Path(tiny_checkpoint), **paths}, obs)
    yield Fleet(app, port, ft2_port, root, info, expected, obs)
    serve.delete(APP)


def assert_same(action: dict, expected: dict, what: str) -> None:
    assert set(action) == set(expected), what
    for key in expected:
        np.testing.assert_allclose(action[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=f"{what}: {key}")


def test_fine_tunes_differ_and_info_lists_them(fleet):
    a, b = fleet.expected["ft1"], fleet.expected["ft2"]
    assert any(not np.allclose(a[k], b[k]) for k in a), "two seeds built the same weights"
    models = fleet.info["embodiments"]["gr1"]["models"]
    assert set(models) == {"default", "ft1", "ft2", "ft3", "broken"}
    assert models["ft1"]["checkpoint"].endswith("tiny-gr1-seed1")
    assert fleet.info["embodiments"]["gr1"]["max_models_per_replica"] == 2


def test_each_request_is_answered_by_the_weights_it_asked_for(fleet):
    for name in ["default", "ft1", "ft2", "ft3"]:
        # options["model_id"] (an upstream client's options, unmodified) and our client's model_id= argument
        with fleet.client() as c:
            action, info = c.get_action(fleet.obs, {**SEED, "model_id": name})
        assert info["server"]["model_id"] == name
        assert_same(action, fleet.expected[name], f"options model_id={name}")
        with fleet.client(model_id=name) as c:
            action, _ = c.get_action(fleet.obs, dict(SEED))
            assert set(c.get_modality_config()) == {"video", "state", "action", "language"}
        assert_same(action, fleet.expected[name], f"client model_id={name}")


def test_a_port_default_model_answers_requests_that_name_none(fleet):
    with PolicyClient("127.0.0.1", fleet.ft2_port, timeout_ms=120_000) as c:
        assert c.info()["default_model"] == "ft2"
        action, info = c.get_action(fleet.obs, dict(SEED))
        assert info["server"]["model_id"] == "ft2"
        assert_same(action, fleet.expected["ft2"], "port default ft2")
        action, _ = c.get_action(fleet.obs, {**SEED, "model_id": "default"})  # a request's choice wins
        assert_same(action, fleet.expected["default"], "default named on the ft2 port")


def test_many_robots_churning_models_each_get_their_own(fleet):
    names = ["default", "ft1", "ft2", "ft3"]  # three fine-tunes on a replica that keeps two: evictions
    errors: list[str] = []

    def robot(i: int) -> None:
        rng = np.random.default_rng(i)
        with fleet.client() as c:
            for _ in range(6):
                name = names[int(rng.integers(len(names)))]
                try:
                    action, info = c.get_action(fleet.obs, {**SEED, "model_id": name})
                    assert info["server"]["model_id"] == name
                    assert_same(action, fleet.expected[name], f"robot {i} model {name}")
                except Exception as exc:  # collected: an assertion in a thread would not fail the test
                    errors.append(f"robot {i} {name}: {exc}")

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a robot never finished"
    assert not errors, errors[:3]
    counts = ingress_status(APP)["models"]
    # Three fine-tunes through two slots: some requests waited on a reload (the churn the test is about).
    assert sum(counts[f"gr1/{n}"]["cold_load_requests"] for n in ("ft1", "ft2", "ft3")) > 3, counts
    assert counts["gr1/default"]["cold_load_requests"] == 0, counts  # the default model is never evicted
    for name in ("ft1", "ft2", "ft3"):  # the load time the replica measured, for the requests that waited on it
        if counts[f"gr1/{name}"]["cold_load_requests"]:
            assert counts[f"gr1/{name}"]["cold_load_ms_mean"] > 0 and counts[f"gr1/{name}"]["cold_load_ms_last"] > 0


def test_least_recently_used_fine_tune_is_evicted(fleet):
    with fleet.client() as c:
        for name in ["ft1", "ft2", "ft1", "ft3"]:  # ft2 is now the least recently used of two slots
            _, answered = c.get_action(fleet.obs, {**SEED, "model_id": name})
        models = c.info()["embodiments"]["gr1"]["models"]
    assert fleet.resident() == ["default", "ft1", "ft3"]
    # One replica runs: `info` names it, and no other (serving.residency prunes replicas gone since).
    assert {r for m in models.values() for r in m["replicas"]} == {answered["server"]["replica"]}


def test_model_metrics_reach_prometheus(fleet, metrics_port):
    from test_metrics import EXPORT_DEADLINE_S, scrape, total

    app = {"application": APP, "embodiment": "gr1"}

    def exported():
        s = scrape(metrics_port)
        got = {
            "requests_ft1": total(s, "ray_fleetserve_model_requests_total", model="ft1", outcome="ok", **app),
            "loads_ft3": total(s, "ray_fleetserve_model_loads_total", model="ft3", outcome="ok", **app),
            "evictions": total(s, "ray_fleetserve_model_evictions_total", **app),
            "load_ms": total(s, "ray_fleetserve_model_load_ms_count", preset="checkpoint", **app),
            "resident": total(s, "ray_fleetserve_models_resident", **app),
        }
        return got if all(v for v in got.values()) else None

    got = wait_for(exported, EXPORT_DEADLINE_S, "the model metrics on Ray's Prometheus endpoint")
    assert got["resident"] <= 2  # max_models_per_replica


def test_broken_model_fails_only_its_own_requests(fleet):
    with fleet.client(model_id="broken") as c:
        with pytest.raises(PolicyServerError, match=r"model 'broken' failed to load: .*model\.safetensors"):
            c.get_action(fleet.obs, dict(SEED))
    with fleet.client(model_id="ft1") as c:
        action, _ = c.get_action(fleet.obs, dict(SEED))
    assert_same(action, fleet.expected["ft1"], "ft1 after a broken model")


def test_unknown_model_is_refused_listing_the_served_ones(fleet):
    with fleet.client() as c:
        with pytest.raises(PolicyServerError, match=r"model_id: 'ft9' is not served for 'gr1'; served: broken, default, ft1"):
            c.get_action(fleet.obs, {"model_id": "ft9"})
        with pytest.raises(PolicyServerError, match="model_id: expected a string"):
            c.get_action(fleet.obs, {"model_id": 3})


def test_adding_and_removing_a_model_reconfigures_without_restarting(fleet):
    with fleet.client() as c:
        _, before = c.get_action(fleet.obs, dict(SEED))
    # The live set goes in the deployment's user_config: a change there reconfigures the replica, while a
    # change under `args:` would rebuild the whole application.
    app = {**fleet.app, "deployments": [dict(d) for d in fleet.app["deployments"]]}
    gr1 = next(d for d in app["deployments"] if d["name"] == "gr1")
    gr1["user_config"] = {**gr1["user_config"], "models": {
        "ft1": {"checkpoint": str(fleet.root / "tiny-gr1-seed1")},
        "ft4": {"demo_preset": "tiny", "demo_seed": 4},  # built under checkpoint_root by the tool, below
        "ft5": {"demo_preset": "tiny", "demo_seed": 5},  # never built
    }}
    # Replicas only load: a demo fine-tune added live is built first, as `python -m serving.demo_checkpoints` does.
    live = demo_checkpoints.live_demo_sources(FleetArgs.model_validate(app["args"]), app["deployments"])
    assert [(tag, src.demo_seed) for tag, src in live] == [("gr1", 4), ("gr1", 5)]
    demo_checkpoints.build(live[:1])
    deploy_config([app])

    def served():
        with fleet.client() as c:
            return set(c.info()["embodiments"]["gr1"]["models"]) == {"default", "ft1", "ft4", "ft5"}

    wait_for(served, 120, "the new model set to be served")
    with fleet.client(model_id="ft4") as c:
        action, after = c.get_action(fleet.obs, dict(SEED))
    expected = in_process_actions({"ft4": build_fine_tune(fleet.root / "reference", 4)}, fleet.obs)["ft4"]
    assert_same(action, expected, "hot-added ft4")
    assert after["server"]["replica"] == before["server"]["replica"], "the replica restarted"
    with fleet.client(model_id="ft5") as c:  # the replica does not build it: it says how to
        with pytest.raises(PolicyServerError, match=r"not built at .* `python -m serving.demo_checkpoints"):
            c.get_action(fleet.obs, dict(SEED))
    with fleet.client(model_id="ft2") as c:
        with pytest.raises(PolicyServerError, match="'ft2' is not served"):
            c.get_action(fleet.obs, dict(SEED))
