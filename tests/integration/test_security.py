"""Security of a served fleet: API tokens (global and per port), CurveZMQ with a client allow-list, `kill`
refused, loopback-only by default, and no pickle (nor eval) anywhere a robot's bytes are decoded.

The module's app takes tokens: gr1's port the ingress-wide one, unitree_g1's port its own. The CurveZMQ test
redeploys the same app with `ingress.curve` added (only the ingress restarts; the policy replicas stay) and
puts the plain config back afterwards.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq
from ray import serve

from clients import CodecError, PolicyClient, PolicyServerError, packb, unpackb
from tests.support.hostile_corpus import CATEGORIES, HostileGenerator, pickled_object_npy
from clients.keys import generate_keypair
from clients.observations import random_observation
from support.net import free_port
from support.serve_apps import app_entry, deploy_config, ingress_status
from serving.config import IngressConfig
from clients.protocol import UNAUTHORIZED

APP = "security-test"
ROOT = Path(__file__).resolve().parents[2]
GLOBAL_TOKEN = "global-token-7f3a"
PORT_TOKEN = "port-token-91c2"
SERVER, ALLOWED, STRANGER = generate_keypair(), generate_keypair(), generate_keypair()
REFUSED_TIMEOUT_MS = 2_000


@pytest.fixture(scope="module")
def secure_fleet(ray_session, tiny_checkpoint):
    ports = {"gr1": free_port(), "unitree_g1": free_port()}
    app = app_entry(APP, tiny_checkpoint, ports, ingress={"api_token": GLOBAL_TOKEN})
    app["args"]["ingress"]["ports"][1]["api_token"] = PORT_TOKEN  # unitree_g1's port: its own token
    assert app["args"]["ingress"]["ports"][1]["embodiment"] == "unitree_g1"
    deploy_config([app])
    with _client(ports["gr1"], GLOBAL_TOKEN, timeout_ms=60_000) as c:
        info = c.info()
    yield ports, info, app
    serve.delete(APP)


def _client(port: int, token: str | None = None, keys=None, server_key: str | None = None,
            timeout_ms: int = 30_000, **kw) -> PolicyClient:
    if server_key is None:
        return PolicyClient("127.0.0.1", port, timeout_ms=timeout_ms, api_token=token, **kw)
    return PolicyClient("127.0.0.1", port, timeout_ms=timeout_ms, api_token=token, server_public_key=server_key,
                        client_keys=None if keys is None else (keys.public, keys.secret), **kw)


def _unauthorized(call) -> None:
    with pytest.raises(PolicyServerError) as exc:
        call()
    assert str(exc.value) == UNAUTHORIZED == "Unauthorized: Invalid API token"


# ---------------------------------------------------------------------------------------------------------
# API tokens


def test_api_token_right_token_served_wrong_or_missing_token_gets_upstream_text(secure_fleet):
    ports, info, _ = secure_fleet
    gr1 = info["embodiments"]["gr1"]
    obs = random_observation(gr1, 1)
    with _client(ports["gr1"], GLOBAL_TOKEN) as c:
        assert c.ping()
        action, _ = c.get_action(obs)
        assert set(action) == set(gr1["action_dims"])
    for token in (None, "", "wrong", GLOBAL_TOKEN + "x", GLOBAL_TOKEN[:-1], GLOBAL_TOKEN.upper(), PORT_TOKEN):
        with _client(ports["gr1"], token) as c:
            assert not c.ping()
            for call in (lambda: c.get_action(obs), c.get_modality_config, c.info, c.reset, c.kill_server,
                         lambda: c.call_endpoint("ping", requires_input=False)):
                _unauthorized(call)


def test_api_token_per_port_override(secure_fleet):
    ports, info, _ = secure_fleet
    g1 = info["embodiments"]["unitree_g1"]
    with _client(ports["unitree_g1"], PORT_TOKEN) as c:
        action, _ = c.get_action(random_observation(g1, 1))
        assert set(action) == set(g1["action_dims"])
    with _client(ports["unitree_g1"], GLOBAL_TOKEN) as c:  # the ingress-wide token is not this port's
        _unauthorized(lambda: c.get_action(random_observation(g1, 1)))
    with _client(ports["unitree_g1"], None) as c:
        _unauthorized(c.info)
    # The token belongs to the port, whatever embodiment the request routes to.
    with _client(ports["gr1"], GLOBAL_TOKEN, embodiment_tag="unitree_g1") as c:
        action, info2 = c.get_action(random_observation(g1, 1))
        assert info2["server"]["embodiment_tag"] == "unitree_g1"
    with _client(ports["gr1"], PORT_TOKEN, embodiment_tag="unitree_g1") as c:
        _unauthorized(lambda: c.get_action(random_observation(g1, 1)))


# ---------------------------------------------------------------------------------------------------------
# CurveZMQ


def _refused(client: PolicyClient) -> None:
    """ZMQ refuses the handshake: no reply at all, so ping() is False after (about) the client's timeout."""
    t0 = time.monotonic()
    with client:
        assert not client.ping()
    elapsed = time.monotonic() - t0
    assert elapsed < REFUSED_TIMEOUT_MS / 1000 + 3, f"ping took {elapsed:.1f}s, longer than its timeout"


@pytest.fixture
def curve_fleet(secure_fleet):
    """The module's app redeployed with CURVE and an allow-list of one client key; restored afterwards."""
    ports, info, app = secure_fleet
    curved = copy.deepcopy(app)
    curved["args"]["ingress"]["curve"] = {"server_public_key": SERVER.public, "server_secret_key": SERVER.secret,
                                          "allowed_client_keys": [ALLOWED.public]}
    deploy_config([curved])
    try:
        yield ports, info
    finally:
        deploy_config([app])


def test_curve_allowed_client_served_unknown_key_or_no_curve_gets_no_answer(curve_fleet):
    ports, info = curve_fleet
    allowed = dict(keys=ALLOWED, server_key=SERVER.public)
    for port, token in ((ports["gr1"], GLOBAL_TOKEN), (ports["unitree_g1"], PORT_TOKEN)):
        with _client(port, token, timeout_ms=30_000, **allowed) as c:
            assert c.ping(), f"an allow-listed CURVE client got no answer on port {port}"
        _refused(_client(port, token, keys=STRANGER, server_key=SERVER.public, timeout_ms=REFUSED_TIMEOUT_MS))
        _refused(_client(port, token, keys=None, server_key=SERVER.public, timeout_ms=REFUSED_TIMEOUT_MS))  # ephemeral
        _refused(_client(port, token, timeout_ms=REFUSED_TIMEOUT_MS))  # plain ZMQ, no CURVE
        _refused(_client(port, token, keys=ALLOWED, server_key=STRANGER.public, timeout_ms=REFUSED_TIMEOUT_MS))
    # A raw REQ socket without CURVE gets nothing either, even for a kill.
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{ports['gr1']}")
    try:
        sock.send(packb({"endpoint": "kill", "api_token": GLOBAL_TOKEN}))
        assert not sock.poll(REFUSED_TIMEOUT_MS, zmq.POLLIN)
    finally:
        sock.close(0)
    gr1 = info["embodiments"]["gr1"]
    with _client(ports["gr1"], GLOBAL_TOKEN, **allowed) as c:  # the refused peers changed nothing for allowed robots
        action, _ = c.get_action(random_observation(gr1, 1))
        assert set(action) == set(gr1["action_dims"])
    with _client(ports["gr1"], "wrong", **allowed) as c:  # CURVE admits the robot; the token still applies
        _unauthorized(c.info)


# ---------------------------------------------------------------------------------------------------------
# kill, bind address


def test_kill_is_refused_in_every_dialect_and_never_stops_the_server(secure_fleet):
    ports, info, _ = secure_fleet
    before = ingress_status(APP)
    with _client(ports["gr1"], GLOBAL_TOKEN) as c:
        for _ in range(5):
            with pytest.raises(PolicyServerError, match="kill: refused"):
                c.kill_server()
            with pytest.raises(PolicyServerError, match="kill: refused"):
                c.call_endpoint("kill", {"force": True})  # with data, as some wrappers send it
        assert c.ping()
    with _client(ports["gr1"], "wrong") as c:
        _unauthorized(c.kill_server)
    with _client(ports["unitree_g1"], PORT_TOKEN, embodiment_tag="gr1") as c:
        with pytest.raises(PolicyServerError, match="kill: refused"):
            c.kill_server()
    time.sleep(0.5)  # a server that obeyed would be gone by now; what follows must still be served
    with _client(ports["gr1"], GLOBAL_TOKEN) as c:
        assert c.ping()
        action, _ = c.get_action(random_observation(info["embodiments"]["gr1"], 1))
        assert set(action) == set(info["embodiments"]["gr1"]["action_dims"])
    after = ingress_status(APP)
    assert after["ports"] == before["ports"]
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    assert all(d.status == "HEALTHY" for d in status.deployments.values())


def _listening(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6} (hex address:port, state 0A = LISTEN)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                addr, hexport = fields[1].split(":")
                if int(hexport, 16) == port and fields[3] == "0A":
                    if width == 8:
                        found.append(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
                    else:
                        found.append(f"v6:{addr}")
    return found


def test_ingress_binds_loopback_by_default(secure_fleet):
    ports, _, _ = secure_fleet
    assert IngressConfig().host == "127.0.0.1"
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    for app in config["applications"]:
        assert app["args"]["ingress"].get("host", IngressConfig().host) == "127.0.0.1", app["name"]
    # The deployed app (its config sets no host) listens on 127.0.0.1 only.
    for port in ports.values():
        assert _listening(port) == ["127.0.0.1"], (port, _listening(port))


# ---------------------------------------------------------------------------------------------------------
# no pickle, no eval


class _Canary:
    """Unpickling this creates a directory: proof that something unpickled robot bytes."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _forbid_pickle(monkeypatch) -> list[str]:
    calls: list[str] = []

    def forbidden(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called on the decode path")
        return refuse

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, forbidden(f"pickle.{name}"))
    monkeypatch.setattr(pickle, "Unpickler", forbidden("pickle.Unpickler"))
    monkeypatch.setattr(np, "load", forbidden("np.load"))
    monkeypatch.setattr(np.lib.format, "read_array", forbidden("np.lib.format.read_array"))
    return calls


def test_codec_never_unpickles_hostile_input(monkeypatch, tmp_path):
    canary = tmp_path / "canary"
    evil = pickle.dumps(np.array([_Canary(str(canary))], dtype=object))
    payloads = [
        # np.save(allow_pickle=True) of an object array, made before pickle is forbidden
        (lambda: (buf := io.BytesIO(), np.save(buf, np.array([_Canary(str(canary))], dtype=object), allow_pickle=True),
                  buf.getvalue())[2])(),
        pickled_object_npy([1, "x"]),
        b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n" + evil,
    ]
    emb = {
        "video_keys": ["cam"], "state_dims": {"arm": 7},
        "modality_config": {"video": {"delta_indices": [0]}, "state": {"delta_indices": [0]},
                            "language": {"modality_keys": ["task"], "delta_indices": [0]}},
    }
    gen = HostileGenerator(emb, seed=5)
    hostile = [gen.make(name).payload for name in CATEGORIES for _ in range(20)]
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Canary(str(probe))))
    assert probe.exists(), "the canary does not work: unpickling it must create its directory"
    calls = _forbid_pickle(monkeypatch)
    for npy in payloads:
        for wire in ({"__ndarray_class__": True, "as_npy": npy},
                     {b"nd": True, b"type": "|O", b"kind": b"", b"shape": [1], b"data": evil}):
            with pytest.raises(CodecError, match="refused"):
                unpackb(packb({"endpoint": "get_action", "data": {"observation": {"state": {"arm": wire}}}}))
    for body in hostile:
        try:
            unpackb(body)
        except CodecError:
            pass
    assert not calls, calls
    assert not canary.exists()


def test_server_refuses_a_pickle_bomb_without_running_it(secure_fleet, tmp_path):
    ports, info, _ = secure_fleet
    canary = tmp_path / "server-canary"
    evil = io.BytesIO()
    np.save(evil, np.array([_Canary(str(canary))], dtype=object), allow_pickle=True)
    obs = random_observation(info["embodiments"]["gr1"], 1)
    key = next(iter(obs["state"]))
    obs["state"][key] = {"__ndarray_class__": True, "as_npy": evil.getvalue()}
    with _client(ports["gr1"], GLOBAL_TOKEN) as c:
        with pytest.raises(PolicyServerError, match=rf"state\.{re.escape(key)}.*refused"):
            c.get_action(obs)
        assert c.ping()
    assert not canary.exists(), "the server unpickled a robot's bytes"
