"""The Ray Serve application end to end: a real Serve app, real ZMQ sockets on 127.0.0.1, tiny real models.

Robots are `clients.PolicyClient`s (or raw REQ sockets where a test speaks an older client's dialect).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import zmq
from ray import serve

from clients import ModalityConfig, PolicyClient, PolicyServerError, packb, unpackb
from clients.observations import random_observation, to_flat
from support.net import free_port
from support.serve_apps import deploy_config, fleet_app

APP = "fleet-test"


@dataclass
class Fleet:
    app: dict  # its entry in a serve config
    ports: dict[str, int]  # embodiment -> its port
    info: dict  # the info endpoint's reply

    def client(self, tag: str = "gr1", **kw) -> PolicyClient:
        return PolicyClient("127.0.0.1", self.ports[tag], timeout_ms=60_000, **kw)

    def embodiment(self, tag: str) -> dict:
        return self.info["embodiments"][tag]


@pytest.fixture(scope="module")
def fleet(ray_session, tiny_checkpoint):
    ports = {"gr1": free_port(), "unitree_g1": free_port()}
    app = fleet_app(tiny_checkpoint, ports)
    deploy_config([app])
    with PolicyClient("127.0.0.1", ports["gr1"], timeout_ms=60_000) as c:
        info = c.info()
    yield Fleet(app, ports, info)
    serve.delete(APP)


def raw_call(port: int, message: dict, timeout_ms: int = 60_000):
    """One request as an arbitrary (older) client would send it, on a fresh REQ socket."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send(packb(message))
        return unpackb(sock.recv())
    finally:
        sock.close()


def assert_actions(action: dict, embodiment: dict, batch: int) -> None:
    assert set(action) == set(embodiment["action_dims"])
    for key, dim in embodiment["action_dims"].items():
        assert action[key].dtype == np.float32, key
        assert action[key].shape == (batch, embodiment["action_horizon"], dim), key
        assert np.isfinite(action[key]).all(), key


def test_every_endpoint_through_policy_client(fleet):
    with fleet.client("gr1") as c:
        assert c.ping()
        modality = c.get_modality_config()
        assert set(modality) == {"video", "state", "action", "language"}
        assert all(isinstance(m, ModalityConfig) for m in modality.values())
        assert modality["video"].modality_keys == fleet.embodiment("gr1")["video_keys"]
        assert isinstance(c.reset(), dict)
        assert isinstance(c.reset({"episode": 3}), dict)
        info = c.info()
        assert info["default_embodiment"] == "gr1"
        assert set(info["embodiments"]) == {"gr1", "unitree_g1"}
        assert info["version"]
        gr1 = info["embodiments"]["gr1"]
        for field in ("modality_config", "state_dims", "action_dims", "action_horizon", "video_keys", "image_size", "model"):
            assert field in gr1, field
        action, action_info = c.get_action(random_observation(gr1, 2))
        assert_actions(action, gr1, 2)
        server = action_info["server"]
        assert server["embodiment_tag"] == "gr1"
        assert server["batch_size"] >= 2
        for field in ("replica", "queue_ms", "infer_ms", "total_ms"):
            assert field in server, field
        # The request's time splits into its wait for a forward pass and the pass itself, within the total the
        # ingress measured (each figure rounded to 1 us): a real forward pass of 2 samples takes time.
        assert server["infer_ms"] > 0, server
        assert server["queue_ms"] + server["infer_ms"] <= server["total_ms"] + 0.01, server
        with pytest.raises(PolicyServerError, match="kill: refused"):
            c.kill_server()
        assert c.ping(), "kill must never stop the server"


def test_each_port_serves_its_embodiment_and_the_field_overrides(fleet):
    g1 = fleet.embodiment("unitree_g1")
    with fleet.client("unitree_g1") as c:
        action, info = c.get_action(random_observation(g1, 1))
        assert_actions(action, g1, 1)
        assert info["server"]["embodiment_tag"] == "unitree_g1"
    # Routed by the request's top-level field, on the gr1 port, case-insensitively.
    with fleet.client("gr1", embodiment_tag="UNITREE_G1") as c:
        action, info = c.get_action(random_observation(g1, 1))
        assert_actions(action, g1, 1)
        assert info["server"]["embodiment_tag"] == "unitree_g1"
        assert set(c.get_modality_config()["video"].modality_keys) == set(g1["video_keys"])
    with fleet.client("gr1", embodiment_tag="franka") as c:
        assert not c.ping()  # routing applies to every endpoint
        with pytest.raises(PolicyServerError, match=r"'franka' is not served here; served: gr1, unitree_g1"):
            c.get_action(random_observation(fleet.embodiment("gr1"), 1))


def test_flat_observation_in_flat_action_out(fleet):
    gr1 = fleet.embodiment("gr1")
    flat = to_flat(random_observation(gr1, 3))
    reply = raw_call(fleet.ports["gr1"], {"endpoint": "get_action", "data": {"observation": flat, "options": None}})
    assert isinstance(reply, list) and len(reply) == 2, reply
    action, info = reply
    assert set(action) == {f"action.{k}" for k in gr1["action_dims"]}
    assert_actions({k.removeprefix("action."): v for k, v in action.items()}, gr1, 3)
    assert info["server"]["embodiment_tag"] == "gr1"


def test_n15_envelope_gets_the_action_dict_alone(fleet):
    gr1 = fleet.embodiment("gr1")
    batched = to_flat(random_observation(gr1, 2))
    action = raw_call(fleet.ports["gr1"], {"endpoint": "get_action", "data": batched})
    assert isinstance(action, dict) and "error" not in action, action
    assert_actions({k.removeprefix("action."): v for k, v in action.items()}, gr1, 2)
    # N1.5 also took one environment without the batch axis, and answered without it.
    single = {k: (v[0] if isinstance(v, np.ndarray) else v[0]) for k, v in batched.items()}
    action = raw_call(fleet.ports["gr1"], {"data": single})  # no endpoint: get_action
    assert "error" not in action, action
    for key, dim in gr1["action_dims"].items():
        assert action[f"action.{key}"].shape == (gr1["action_horizon"], dim)


def _msgpack_numpy(arr: np.ndarray) -> dict:
    """An array as N1.7 clients send it (msgpack-numpy: bytes keys, raw data)."""
    arr = np.ascontiguousarray(arr)
    return {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": list(arr.shape), b"data": arr.tobytes()}


def test_n17_msgpack_numpy_arrays_are_accepted(fleet):
    gr1 = fleet.embodiment("gr1")
    obs = random_observation(gr1, 1)
    wire = {
        "video": {k: _msgpack_numpy(v) for k, v in obs["video"].items()},
        "state": {k: _msgpack_numpy(v) for k, v in obs["state"].items()},
        "language": obs["language"],
    }
    reply = raw_call(fleet.ports["gr1"], {"endpoint": "get_action", "data": {"observation": wire, "options": {"seed": 7}}})
    assert isinstance(reply, list), reply
    expected, _ = fleet.client("gr1").get_action(obs, {"seed": 7})
    for key in gr1["action_dims"]:
        np.testing.assert_allclose(reply[0][key], expected[key], atol=1e-5)


def _crowd(fleet: Fleet, jobs: list[tuple[str, dict, dict | None]]) -> list[tuple[dict, dict]]:
    """Send every job at once, one robot (client, thread) each; return the replies in order."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def robot(i: int, tag: str, obs: dict, options: dict | None) -> None:
        with fleet.client(tag) as c:
            barrier.wait(timeout=60)
            try:
                results[i] = c.get_action(obs, options)
            except Exception as exc:  # reported below, with the robot that got it
                results[i] = exc

    threads = [threading.Thread(target=robot, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    failures = [(i, r) for i, r in enumerate(results) if not isinstance(r, tuple)]
    assert not failures, f"robots without an action: {failures[:3]}"
    return results


def test_32_robots_over_two_embodiments_all_answered_and_batched(fleet):
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(32):
        tag = "gr1" if i % 2 else "unitree_g1"
        size = [(64, 64), (48, 80), (224, 224)][i % 3]  # cameras of different resolutions batch together
        jobs.append((tag, random_observation(fleet.embodiment(tag), 1 + i % 3, image_size=size, rng=rng), None))
    results = _crowd(fleet, jobs)
    batch_sizes = []
    for (tag, obs, _), (action, info) in zip(jobs, results):
        assert_actions(action, fleet.embodiment(tag), obs["state"][next(iter(obs["state"]))].shape[0])
        assert info["server"]["embodiment_tag"] == tag
        batch_sizes.append(info["server"]["batch_size"])
    assert max(batch_sizes) > 3, f"no request rode in a batch larger than its own B: {batch_sizes}"


def test_seeded_request_answers_the_same_alone_and_in_a_crowd(fleet):
    gr1 = fleet.embodiment("gr1")
    rng = np.random.default_rng(1)
    probe = random_observation(gr1, 1, rng=rng)
    with fleet.client("gr1") as c:
        alone, alone_info = c.get_action(probe, {"seed": 1234})
    for _attempt in range(3):  # a crowd that happened to reach the replica one by one proves nothing; retry
        jobs = [("gr1", probe, {"seed": 1234})] + [("gr1", random_observation(gr1, 1, rng=rng), None) for _ in range(15)]
        crowded, info = _crowd(fleet, jobs)[0]
        if info["server"]["batch_size"] > 1:
            break
    assert info["server"]["batch_size"] > 1, "the seeded request never shared a forward pass"
    for key in gr1["action_dims"]:
        np.testing.assert_allclose(crowded[key], alone[key], atol=1e-5, err_msg=key)


def test_user_config_batch_size_changes_live_without_restarting_replicas(fleet, tiny_checkpoint):
    gr1 = fleet.embodiment("gr1")
    jobs = [("gr1", random_observation(gr1, 1), None) for _ in range(12)]
    before = {info["server"]["replica"] for _, info in _crowd(fleet, jobs)}
    try:
        deploy_config([fleet_app(tiny_checkpoint, fleet.ports, max_batch_size=1)])
        results = _crowd(fleet, jobs)
        assert {info["server"]["batch_size"] for _, info in results} == {1}
        assert {info["server"]["replica"] for _, info in results} == before, "replicas restarted"
    finally:
        deploy_config([fleet.app])


def test_info_names_the_device_each_replica_got_and_its_warm_up(fleet):
    from serving.ingress import _device_of

    for tag in ("gr1", "unitree_g1"):
        model = fleet.embodiment(tag)["model"]
        assert model["device"] == "cpu" and model["dtype"] == "float32", model
        assert model["warmup_seconds"] is not None and model["warmup_seconds"] > 0, "replica warmed up at load"
        assert model["ray_gpu_ids"] == []  # no num_gpus in the test config
        assert _device_of(fleet.embodiment(tag)) == "cpu (float32)"  # what the 'Fleet ready' line says
    gpu = {"model": {"device": "cuda:0", "device_name": "NVIDIA H100", "dtype": "bfloat16"}}
    assert _device_of(gpu) == "cuda:0 (NVIDIA H100, bfloat16)"


# ---------------------------------------------------------------------------------------------------------
# the fleet loop: real-time chunking, robot sessions, deadlines from action buffers


def _chunk_rows_match(answer: np.ndarray, chunk: np.ndarray) -> int | None:
    """The row of `chunk` the answer's first row is exactly (a continuation), or None."""
    for e in range(chunk.shape[1]):
        if np.array_equal(answer[0, 0], chunk[0, e]):
            return e
    return None


def test_explicit_rtc_freezes_the_given_steps_exactly_through_serve(fleet):
    gr1 = fleet.embodiment("gr1")
    with fleet.client("gr1") as c:
        obs = random_observation(gr1, 1, rng=np.random.default_rng(11))
        first, _ = c.get_action(obs, {"seed": 1})
        prev = {k: v[:, 6:].copy() for k, v in first.items()}
        second, _ = c.get_action(obs, {"seed": 2, "rtc": {"prev_actions": prev, "frozen_steps": 4}})
    for key in second:
        np.testing.assert_allclose(second[key][:, :4], prev[key][:, :4], atol=1e-5)


def test_a_robot_session_continues_the_last_chunk_and_reset_forgets_it(fleet):
    gr1 = fleet.embodiment("gr1")
    opts = {"robot_id": "arm-7", "control_hz": 30.0}
    with fleet.client("gr1") as c:
        obs = random_observation(gr1, 1, rng=np.random.default_rng(12))
        first, _ = c.get_action(obs, {**opts, "seed": 1})
        second, _ = c.get_action(obs, {**opts, "seed": 2})  # the server hands the unexecuted rest to the model
        key = "left_hand"  # absolute: the continued rows are the delivered ones exactly
        assert _chunk_rows_match(second[key], first[key]) is not None
        c.reset({"robot_id": "arm-7"})
        fresh, _ = c.get_action(obs, {**opts, "seed": 2})
        assert _chunk_rows_match(fresh[key], second[key]) is None
        other, _ = c.get_action(obs, {"seed": 3})  # no robot_id: no session
        assert _chunk_rows_match(other[key], fresh[key]) is None


def test_buffer_steps_set_the_deadline_and_a_dry_buffer_is_an_underrun(fleet):
    from support.serve_apps import ingress_status

    gr1 = fleet.embodiment("gr1")
    with fleet.client("gr1") as c:
        obs = random_observation(gr1, 1, rng=np.random.default_rng(13))
        _, info = c.get_action(obs, {"buffer_steps": 300, "control_hz": 30.0})
        assert info["server"]["due_ms"] == pytest.approx(10_000.0)  # when the 300 steps run dry
        assert info["server"]["deadline_ms"] > 10_000.0  # orders the queue; refusals go by the deadline
        before = ingress_status("fleet-test")["embodiments"]["gr1"]["buffer_underruns"]
        _, info = c.get_action(obs, {"buffer_steps": 0, "control_hz": 30.0})  # dry already: answered, counted
        assert info["server"]["deadline_ms"] > 1000
        assert ingress_status("fleet-test")["embodiments"]["gr1"]["buffer_underruns"] == before + 1
        with pytest.raises(PolicyServerError, match=r"options.buffer_steps: needs the robot's control rate") as err:
            c.get_action(obs, {"buffer_steps": 5})
        assert err.value.kind == "bad_request"
        with pytest.raises(PolicyServerError, match=r"options.control_hz: expected a control rate"):
            c.get_action(obs, {"buffer_steps": 5, "control_hz": -1})
