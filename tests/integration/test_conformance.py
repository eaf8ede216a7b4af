"""Conformance: every GR00T client in the field, unmodified, against the real served app.

Clients: re-implementations of upstream's N1.5, N1.6 and N1.7 clients (tests/support/upstream_clients.py, each citing the
source it was read from; the N1.7 one uses the real `msgpack-numpy` package as its codec), the real
`inspect-robots-unitree-g1` client from PyPI driven through its own transport and its own `Gr00tPolicy.act()`,
and our `clients.PolicyClient`. ONE module-scoped app serves them all: gr1 and unitree_g1 on `auto` ports, both
again on `n1.5` ports, and gr1 on a port with an api_token.

The README's compatibility table is rendered by `python -m tools.conformance_table`, whose rows name the tests
here that prove them; tests/unit/test_conformance_table.py checks that those tests exist and that the README holds
the tool's rendering (no test writes the README).
"""

from __future__ import annotations

import json
import re
import shutil

import msgpack
import numpy as np
import pytest
import zmq

from clients import PolicyClient, PolicyServerError
from clients.observations import random_observation
from clients.protocol import ERROR_KINDS, to_flat

APP = "conformance"
TOKEN = "conformance-token"
TAGS = ("gr1", "unitree_g1")


# ---------------------------------------------------------------------------------------------------------
# the app


@pytest.fixture(scope="module")
def g1_one_camera_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with unitree_g1 seeing through one camera, `ego_view`: the G1 client sends one."""
    path = tmp_path_factory.mktemp("conformance") / "tiny"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "processor_config.json").read_text())
    config["processor_kwargs"]["modality_configs"]["unitree_g1"]["video"]["modality_keys"] = ["ego_view"]
    (path / "processor_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def served(ray_session, g1_one_camera_checkpoint):
    from ray import serve

    from support.net import free_port
    from support.serve_apps import app_entry, deploy_config

    ports = {"gr1": free_port(), "unitree_g1": free_port()}
    n15 = {"gr1": free_port(), "unitree_g1": free_port()}
    token_port = free_port()
    app = app_entry(APP, g1_one_camera_checkpoint, ports)
    app["args"]["ingress"]["ports"] += [{"port": p, "embodiment": t, "protocol": "n1.5"} for t, p in n15.items()]
    app["args"]["ingress"]["ports"].append({"port": token_port, "embodiment": "gr1", "api_token": TOKEN})
    deploy_config([app])
    with PolicyClient("127.0.0.1", ports["gr1"], timeout_ms=60_000) as c:
        info = c.info()
    yield {"auto": ports, "n1.5": n15, "token": token_port, "info": info}
    serve.delete(APP)


def _embodiment(served, tag):
    return served["info"]["embodiments"][tag]


def _assert_actions(action: dict, embodiment: dict, batch: int | None, prefix: str = "") -> None:
    assert set(action) == {prefix + k for k in embodiment["action_dims"]}, sorted(action)
    for key, dim in embodiment["action_dims"].items():
        arr = action[prefix + key]
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32, (key, type(arr))
        want = (embodiment["action_horizon"], dim) if batch is None else (batch, embodiment["action_horizon"], dim)
        if batch is None:
            want = tuple(np.squeeze(np.zeros(want)).shape)  # N1.5 squeezed every size-1 axis
        assert arr.shape == want, (key, arr.shape, want)
        assert np.isfinite(arr).all(), key


def _n15_observation(embodiment: dict, batch: int | None, rng) -> dict:
    """What N1.5's example client sends: flat keys, float64 states, B left out for one environment."""
    flat = to_flat(random_observation(embodiment, batch or 1, image_size=(32, 32), rng=rng))
    out = {}
    for key, value in flat.items():
        if key.startswith("state."):
            value = value.astype(np.float64)
        if batch is None and isinstance(value, np.ndarray):
            value = value[0]
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# upstream's clients


@pytest.mark.parametrize("tag", TAGS)
def test_n15_client(served, tag):
    from support.upstream_clients import N15Client

    emb = _embodiment(served, tag)
    rng = np.random.default_rng(15)
    client = N15Client("127.0.0.1", served["n1.5"][tag])
    try:
        assert client.ping()
        configs = client.get_modality_config()
        assert set(configs) == {"video", "state", "action", "language"}
        assert configs["video"].modality_keys == emb["video_keys"]
        assert configs["action"].delta_indices == list(range(emb["action_horizon"]))
        action = client.get_action(_n15_observation(emb, None, rng))
        assert isinstance(action, dict) and "error" not in action
        _assert_actions(action, emb, None, prefix="action.")
        action = client.get_action(_n15_observation(emb, 2, rng))
        _assert_actions(action, emb, 2, prefix="action.")
        bad = _n15_observation(emb, None, rng)
        missing = next(k for k in bad if k.startswith("state."))
        del bad[missing]
        with pytest.raises(RuntimeError, match=f"Server error: .*{re.escape(missing)}"):
            client.get_action(bad)
        assert client.last_reply["kind"] == "bad_request"
        with pytest.raises(RuntimeError, match="kill: refused"):
            client.kill_server()
        assert client.last_reply["kind"] == "refused"
        assert client.ping(), "kill must never stop the server"
    finally:
        client.close()


@pytest.mark.parametrize("generation", ["n1.6", "n1.7"])
@pytest.mark.parametrize("tag", TAGS)
def test_n16_n17_clients(served, tag, generation):
    from support.upstream_clients import N16Client, N17Client

    emb = _embodiment(served, tag)
    rng = np.random.default_rng(16)
    client = (N16Client if generation == "n1.6" else N17Client)("127.0.0.1", served["auto"][tag])
    try:
        assert client.ping()
        configs = client.get_modality_config()
        assert set(configs) == {"video", "state", "action", "language"}
        assert configs["video"].modality_keys == emb["video_keys"]
        assert client.reset() == {} and isinstance(client.reset({"episode": 1}), dict)
        observation = random_observation(emb, 2, image_size=(32, 32), rng=rng)
        action, info = client.get_action(observation, {"seed": 3})
        _assert_actions(action, emb, 2)
        assert info["server"]["embodiment_tag"] == tag
        action, info = client.get_action(to_flat(observation), {"seed": 3})
        _assert_actions(action, emb, 2, prefix="action.")
        # The reply's arrays came in the client's own encoding: one more exchange, read without any hook.
        packed = client._pack(client._request("get_action", {"observation": observation, "options": None}, True))
        reply = msgpack.unpackb(client._exchange(packed), raw=False, strict_map_key=False)
        first = reply[0][next(iter(emb["action_dims"]))]
        if generation == "n1.6":
            assert set(first) == {"__ndarray_class__", "as_npy"}
        else:
            assert set(first) == {b"nd", b"type", b"kind", b"shape", b"data"}
        with pytest.raises(RuntimeError, match="Server error: .*expected"):
            client.get_action({"video": {}, "state": {}, "language": {}})
        assert client.last_reply["kind"] == "bad_request"
        with pytest.raises(RuntimeError, match="kill: refused"):
            client.kill_server()
        assert client.last_reply["kind"] == "refused"
        assert client.ping()
    finally:
        client.close()
    wrong = (N16Client if generation == "n1.6" else N17Client)("127.0.0.1", served["token"], api_token="wrong")
    try:
        with pytest.raises(RuntimeError, match="Server error: Unauthorized: Invalid API token"):
            wrong.ping()  # upstream's ping catches only ZMQ errors: an error reply raises
        assert wrong.last_reply == {"error": "Unauthorized: Invalid API token", "kind": "unauthorized"}
    finally:
        wrong.close()


def test_inspect_robots_unitree_g1(served):
    """The real third-party client (PyPI), through its own msgpack-numpy transport and its own act()."""
    from inspect_robots.scene import Scene
    from inspect_robots.types import Observation
    from inspect_robots_unitree_g1 import Gr00tPolicy

    emb = _embodiment(served, "unitree_g1")
    rng = np.random.default_rng(17)
    policy = Gr00tPolicy(host="127.0.0.1", port=served["auto"]["unitree_g1"], timeout_s=60.0)
    policy.reset(Scene(id="conformance", instruction="pick up the cup"))
    state = {"joint_pos": rng.uniform(-0.5, 0.5, 16)}
    for key in ("left_leg", "right_leg", "waist"):
        state[key] = rng.uniform(-0.5, 0.5, emb["state_dims"][key])
    observation = Observation(images={"head_cam": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)}, state=state)
    chunk = policy.act(observation)
    assert len(chunk.actions) == 16 and policy.num_inferences == 1
    for action in chunk.actions:
        assert action.data.shape == (16,) and np.isfinite(action.data).all()
    # Its error detection: a port that wants a token it does not send.
    refused = Gr00tPolicy(host="127.0.0.1", port=served["token"], timeout_s=60.0)
    refused.reset(Scene(id="conformance", instruction="x"))
    with pytest.raises(RuntimeError, match="GR00T server error: Unauthorized"):
        refused.act(observation)


# ---------------------------------------------------------------------------------------------------------
# ours


def test_our_client(served):
    gr1 = _embodiment(served, "gr1")
    with PolicyClient("127.0.0.1", served["auto"]["gr1"], timeout_ms=60_000) as c:
        assert c.ping() and c.info()["default_embodiment"] == "gr1"
        action, info = c.get_action(random_observation(gr1, 1, image_size=(32, 32)))
        _assert_actions(action, gr1, 1)
        action, _ = c.get_action(to_flat(random_observation(gr1, 1, image_size=(32, 32))))
        _assert_actions(action, gr1, 1, prefix="action.")
        with pytest.raises(PolicyServerError) as err:
            c.kill_server()
        assert err.value.kind == "refused" and err.value.kind in ERROR_KINDS
    with PolicyClient("127.0.0.1", served["n1.5"]["gr1"], timeout_ms=60_000) as c:
        configs = c.get_modality_config()  # our codec reads N1.5's JSON-string as_json too
        assert configs["video"].modality_keys == gr1["video_keys"]
        with pytest.raises(PolicyServerError, match="this port speaks N1.5") as err:
            c.get_action(random_observation(gr1, 1, image_size=(32, 32)))
        assert err.value.kind == "bad_request"
    with PolicyClient("127.0.0.1", served["token"], timeout_ms=60_000) as c:
        with pytest.raises(PolicyServerError) as err:
            c.reset()
        assert err.value.kind == "unauthorized"
