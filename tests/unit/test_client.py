"""clients.PolicyClient against a tiny in-process ROUTER server on 127.0.0.1 (real ZMQ sockets)."""

from __future__ import annotations

import gc
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import zmq

from clients import (
    CodecError,
    ModalityConfig,
    PolicyClient,
    PolicyServerError,
    PolicyTimeoutError,
    check_observation,
    packb,
    unpackb,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 5.0  # generous bound for things that should happen at once
NO_REPLY = object()

Handler = Callable[[dict, "FakeServer"], Any]


def echo_handler(request: dict, server: "FakeServer") -> Any:
    endpoint = request.get("endpoint")
    if endpoint == "ping":
        return {"status": "ok", "message": "fake server"}
    if endpoint == "get_action":
        obs = request["data"]["observation"]
        batch = next(iter(obs["state"].values())).shape[0]
        return [{"arm": np.full((batch, 16, 7), 0.5, np.float32)}, {"echo_options": request["data"]["options"]}]
    if endpoint == "reset":
        return {"reset": True, "options": request["data"]["options"]}
    if endpoint == "get_modality_config":
        return {"video": ModalityConfig([0], ["ego_view"]), "action": ModalityConfig(list(range(16)), ["arm"])}
    if endpoint == "info":
        return {"embodiments": ["gr1"], "version": "test"}
    if endpoint == "kill":
        return {"error": "kill is not allowed on this server"}
    return {"error": f"unknown endpoint {endpoint!r}"}


class FakeServer:
    """A ROUTER socket in a thread: records each decoded request, answers with `handler(request, self)`.

    The handler returns a reply object (packed with clients.packb), raw `bytes` (sent as they are), or
    NO_REPLY. The socket lives entirely in the server thread; `stop()` joins it within a deadline.
    """

    def __init__(self, handler: Handler = echo_handler, port: int | None = None,
                 curve_secret: bytes | None = None) -> None:
        self.handler = handler
        self.requests: queue.Queue[dict] = queue.Queue()
        self.identities: list[bytes] = []
        self.port = port
        self._curve_secret = curve_secret
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fake-policy-server", daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT_S), "fake server did not start"
        if self._error:
            raise self._error

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.linger = 0
        try:
            if self._curve_secret is not None:
                sock.curve_server = True
                sock.curve_secretkey = self._curve_secret
            if self.port is None:
                self.port = sock.bind_to_random_port("tcp://127.0.0.1")
            else:
                sock.bind(f"tcp://127.0.0.1:{self.port}")
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self._error = exc
            sock.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                identity, empty, body = sock.recv_multipart()
                self.identities.append(identity)
                request = unpackb(body)
                self.requests.put(request)
                reply = self.handler(request, self)
                if reply is NO_REPLY:
                    continue
                for ident, payload in reply if isinstance(reply, _Replies) else [(identity, reply)]:
                    payload = payload if isinstance(payload, bytes) else packb(payload)
                    sock.send_multipart([ident, b"", payload])
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self._error = exc
        finally:
            sock.close(linger=0)

    def next_request(self) -> dict:
        return self.requests.get(timeout=WAIT_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "fake server thread did not stop"
        if self._error:
            raise self._error


class _Replies(list):
    """A handler result sending several replies: [(identity, payload), ...]."""


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with PolicyClient("127.0.0.1", server.port, timeout_ms=int(WAIT_S * 1000)) as c:
        yield c


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _observation(batch: int = 2) -> dict:
    return {
        "video": {"ego_view": np.zeros((batch, 1, 32, 32, 3), np.uint8)},
        "state": {"arm": np.arange(batch * 7, dtype=np.float32).reshape(batch, 1, 7)},
        "language": {"task": [["pick the cube"]] * batch},
    }


# ---------------------------------------------------------------------------------------------------------
# envelopes and replies


def test_ping_envelope_and_reply(server, client):
    assert client.ping() is True
    assert server.next_request() == {"endpoint": "ping"}


def test_token_and_embodiment_only_when_set(server):
    with PolicyClient("127.0.0.1", server.port, timeout_ms=5000, api_token="s3cret", embodiment_tag="gr1") as c:
        assert c.ping()
        assert server.next_request() == {"endpoint": "ping", "api_token": "s3cret", "embodiment_tag": "gr1"}
        c.info()
        assert server.next_request() == {"endpoint": "info", "api_token": "s3cret", "embodiment_tag": "gr1"}
    with PolicyClient("127.0.0.1", server.port, timeout_ms=5000, embodiment_tag="unitree_g1") as c:
        c.reset()
        assert server.next_request() == {"endpoint": "reset", "data": {"options": None}, "embodiment_tag": "unitree_g1"}


def test_get_action_envelope_and_reply(server, client):
    obs = _observation(batch=3)
    action, info = client.get_action(obs, options={"seed": 7})
    request = server.next_request()
    assert set(request) == {"endpoint", "data"} and request["endpoint"] == "get_action"
    assert set(request["data"]) == {"observation", "options"} and request["data"]["options"] == {"seed": 7}
    sent = request["data"]["observation"]
    np.testing.assert_array_equal(sent["video"]["ego_view"], obs["video"]["ego_view"])
    np.testing.assert_array_equal(sent["state"]["arm"], obs["state"]["arm"])
    assert sent["state"]["arm"].dtype == np.float32 and sent["language"] == obs["language"]
    assert action["arm"].dtype == np.float32 and action["arm"].shape == (3, 16, 7)
    assert info == {"echo_options": {"seed": 7}}
    client.get_action(obs)
    assert server.next_request()["data"]["options"] is None


def test_reset_info_modality_config_envelopes(server, client):
    assert client.reset({"episode": 3}) == {"reset": True, "options": {"episode": 3}}
    assert server.next_request() == {"endpoint": "reset", "data": {"options": {"episode": 3}}}
    configs = client.get_modality_config()
    assert server.next_request() == {"endpoint": "get_modality_config"}
    assert configs == {"video": ModalityConfig([0], ["ego_view"]), "action": ModalityConfig(list(range(16)), ["arm"])}
    assert all(isinstance(c, ModalityConfig) for c in configs.values())
    assert client.info() == {"embodiments": ["gr1"], "version": "test"}
    assert server.next_request() == {"endpoint": "info"}


def test_kill_server_raises_the_servers_error(server, client):
    with pytest.raises(PolicyServerError, match="^kill is not allowed on this server$") as info:
        client.kill_server()
    assert isinstance(info.value, RuntimeError) and info.value.message == "kill is not allowed on this server"
    assert server.next_request() == {"endpoint": "kill"}
    assert client.ping()  # an error reply leaves the socket usable


def test_error_replies_raise_and_ping_reports_false():
    def handler(request, srv):
        return {"error": "Unauthorized: Invalid API token"}

    srv = FakeServer(handler)
    try:
        with PolicyClient("127.0.0.1", srv.port, timeout_ms=5000, api_token="wrong") as c:
            with pytest.raises(PolicyServerError, match="Unauthorized: Invalid API token"):
                c.get_action(_observation())
            with pytest.raises(PolicyServerError, match="Unauthorized"):
                c.get_modality_config()
            assert c.ping() is False
    finally:
        srv.stop()


def test_reply_decoding_variants():
    arr = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    n17 = {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [1, 2, 3], b"data": arr.tobytes()}
    replies = iter([
        msgpack.packb([{"arm": n17}, {}], use_bin_type=True),  # an N1.7-style server
        {"arm": arr},  # an N1.5 server: the action dict alone
        b"\xc1 not msgpack",
        "a bare string",
        {"status": "ok"},
    ])

    def handler(request, srv):
        return next(replies)

    srv = FakeServer(handler)
    try:
        with PolicyClient("127.0.0.1", srv.port, timeout_ms=5000) as c:
            action, info = c.get_action(_observation())
            np.testing.assert_array_equal(action["arm"], arr)
            assert info == {}
            action, info = c.get_action(_observation())
            np.testing.assert_array_equal(action["arm"], arr)
            with pytest.raises(CodecError, match="^<message>: not a valid msgpack message"):
                c.get_action(_observation())
            with pytest.raises(CodecError, match=r"^reply: expected a 2-list \[action, info\], got str"):
                c.get_action(_observation())
            assert c.ping()  # still usable after garbled replies
    finally:
        srv.stop()


def test_strict_mode_checks_before_sending(server):
    with PolicyClient("127.0.0.1", server.port, timeout_ms=5000, strict=True) as c:
        bad = _observation()
        bad["state"]["arm"] = bad["state"]["arm"].astype(np.float64)
        with pytest.raises(ValueError, match=r"observation\.state\.arm: expected float32 with 3 dimensions"):
            c.get_action(bad)
        bad = _observation()
        bad["video"]["ego_view"] = bad["video"]["ego_view"][:, 0]
        with pytest.raises(ValueError, match=r"observation\.video\.ego_view: expected uint8 with 5 dimensions"):
            c.get_action(bad)
        bad = _observation()
        bad["language"]["task"] = ["not nested", 3]
        with pytest.raises(ValueError, match=r"observation\.language\.task"):
            c.get_action(bad)
        bad = _observation(batch=2)
        bad["state"]["arm"] = np.zeros((3, 1, 7), np.float32)
        with pytest.raises(ValueError, match="batch sizes disagree"):
            c.get_action(bad)
        flat = {"video.ego_view": np.zeros((1, 1, 8, 8, 3), np.uint8), "state.arm": np.zeros((1, 1, 7), np.float32),
                "annotation.human.task_description": ["pick"]}
        check_observation(flat)
        with pytest.raises(ValueError, match=r"observation\.state\.arm"):
            check_observation({**flat, "state.arm": [0.0] * 7})
        with pytest.raises(ValueError, match="batch sizes disagree"):
            check_observation({**flat, "annotation.human.task_description": ["pick", "place"]})
        with pytest.raises(ValueError, match=r"observation\.language\.t: expected a list of B lists"):
            check_observation({"language": {"t": ["flat strings only in the flat form"]}})
        # Nothing invalid was sent: the first request the server sees is the valid one below.
        c.get_action(_observation())
        assert server.next_request()["endpoint"] == "get_action"
        assert server.requests.empty()


# ---------------------------------------------------------------------------------------------------------
# timeouts and recovery


def test_dead_server_ping_false_and_get_action_times_out_then_recovers():
    port = _free_port()  # nothing listens here
    timeout_ms = 300
    with PolicyClient("127.0.0.1", port, timeout_ms=timeout_ms) as c:
        t0 = time.monotonic()
        assert c.ping() is False
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < timeout_ms / 1000 + 1.0

        t0 = time.monotonic()
        with pytest.raises(PolicyTimeoutError, match="no reply within 300 ms"):
            c.get_action(_observation())
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < timeout_ms / 1000 + 1.0
        assert isinstance(PolicyTimeoutError(), TimeoutError)

        srv = FakeServer(port=port)  # the server comes up on the same port
        try:
            c.timeout_ms = 10_000
            assert c.ping() is True
            # The timed-out requests died with their sockets: the server saw the new ping only.
            assert srv.next_request() == {"endpoint": "ping"}
            assert srv.requests.empty()
            action, _ = c.get_action(_observation())
            assert action["arm"].shape == (2, 16, 7)
        finally:
            srv.stop()


def test_late_reply_to_a_timed_out_request_is_never_read():
    pending: list[bytes] = []

    def handler(request, srv):
        if not pending:  # first request: keep it unanswered until the next one arrives
            pending.append(srv.identities[-1])
            return NO_REPLY
        return _Replies([(pending[0], {"status": "ok", "message": "STALE"}),
                         (srv.identities[-1], {"status": "ok", "message": "fresh"})])

    srv = FakeServer(handler)
    try:
        with PolicyClient("127.0.0.1", srv.port, timeout_ms=300) as c:
            with pytest.raises(PolicyTimeoutError):
                c.call_endpoint("ping", requires_input=False)
            c.timeout_ms = 5000
            assert c.call_endpoint("ping", requires_input=False)["message"] == "fresh"
            assert len(set(srv.identities)) == 2  # the socket was rebuilt with a new identity
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------
# lifecycle


def test_close_and_context_manager(server):
    c = PolicyClient("127.0.0.1", server.port, timeout_ms=5000)
    assert c.ping()
    c.close()
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.ping()
    with PolicyClient("127.0.0.1", server.port, timeout_ms=5000) as c2:
        assert c2.ping()
    assert c2._socket is None
    with pytest.raises(RuntimeError, match="closed"):
        c2.info()


def test_del_is_safe_even_after_a_failed_init(server):
    c = PolicyClient("127.0.0.1", server.port, timeout_ms=5000)
    assert c.ping()
    del c
    with pytest.raises(ValueError, match="client_keys needs server_public_key"):
        PolicyClient("127.0.0.1", server.port, client_keys=zmq.curve_keypair())
    gc.collect()
    c = PolicyClient("127.0.0.1", server.port, timeout_ms=5000)
    c.__del__()  # explicit double close path
    c.close()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_keys_are_wired_through():
    server_public, server_secret = zmq.curve_keypair()
    srv = FakeServer(curve_secret=server_secret)
    try:
        with PolicyClient("127.0.0.1", srv.port, timeout_ms=5000, server_public_key=server_public.decode()) as c:
            assert c.ping()  # ephemeral client keys
        with PolicyClient("127.0.0.1", srv.port, timeout_ms=5000, server_public_key=server_public,
                          client_keys=zmq.curve_keypair()) as c:
            assert c.ping()
        wrong_public, _ = zmq.curve_keypair()
        with PolicyClient("127.0.0.1", srv.port, timeout_ms=300, server_public_key=wrong_public) as c:
            assert c.ping() is False  # the handshake fails; nothing reaches the server
        with pytest.raises(ValueError, match="40-character z85"):
            PolicyClient("127.0.0.1", srv.port, server_public_key="short")
    finally:
        srv.stop()
    assert srv.requests.qsize() == 2


def test_clients_import_without_torch_or_ray():
    code = (
        "import sys; import clients; "
        "heavy = {'torch', 'ray', 'pydantic', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy; "
        "assert clients.PolicyClient and clients.packb and clients.unpackb"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
