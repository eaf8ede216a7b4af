"""`PolicyClient`: a drop-in for GR00T's `gr00t.policy.server_client.PolicyClient`.

Same constructor, methods and wire format as upstream, minus upstream's known faults: `timeout_ms` really
bounds every call (send and receive together), a timed-out REQ socket is thrown away and rebuilt so the next
call works (and can never read the stale reply), and sockets never linger on close. Not thread-safe: use one
client per thread, as with any ZMQ socket.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zmq

from .codec import CodecError, packb, unpackb
from .modality import ModalityConfig
from .protocol import build_request, reply_error

__all__ = ["PolicyClient", "PolicyServerError", "PolicyTimeoutError", "check_observation"]


class PolicyServerError(RuntimeError):
    """The server answered `{"error": message, "kind": kind}`; `str(exc)` and `exc.message` are the server's message,
    `exc.kind` one of `clients.protocol.ERROR_KINDS` (None from servers that send no kind, such as upstream's),
    `exc.reason` a `clients.protocol.Refusal` value where a valid get_action got no action (else None)."""

    def __init__(self, message: str, kind: str | None = None, reason: str | None = None) -> None:
        self.message = message
        self.kind = kind
        self.reason = reason
        super().__init__(message)


class PolicyTimeoutError(TimeoutError):
    """No reply within `timeout_ms`; the client has already rebuilt its socket and can be used again."""


def _z85_key(key: str | bytes, what: str) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) not in (32, 40):  # 32 raw bytes or 40 z85 characters, as libzmq takes them
        raise ValueError(f"{what}: expected a 40-character z85 key (or 32 raw bytes), got {len(raw)} bytes")
    return raw


def _check_array(value: Any, where: str, dtype: type, ndim: int) -> int:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array, got {type(value).__name__}")
    if value.dtype != dtype or value.ndim != ndim:
        raise ValueError(
            f"{where}: expected {np.dtype(dtype).name} with {ndim} dimensions, "
            f"got {value.dtype.name} with shape {value.shape}"
        )
    return value.shape[0]


def _check_language(value: Any, where: str, flat: bool) -> int:
    if flat and isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):  # B strings
        return len(value)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(row, (list, tuple)) and all(isinstance(s, str) for s in row) for row in value
    ):
        raise ValueError(f"{where}: expected a list of B lists of strings, got {value!r:.80}")
    return len(value)


def check_observation(observation: Any) -> None:
    """Client-side strict check: video uint8 (B,T,H,W,3), state float32 (B,T,D), language [[str]] * B, one B.

    Accepts the nested form and the flat form (`"video.<cam>"`, `"state.<key>"`); raises `ValueError`
    naming the offending key.
    """
    if not isinstance(observation, dict):
        raise ValueError(f"observation: expected a map, got {type(observation).__name__}")
    batch: dict[str, int] = {}
    for key, value in observation.items():
        if not isinstance(key, str):
            raise ValueError(f"observation: keys must be strings, got {type(key).__name__}")
        modality, _, name = key.partition(".")
        flat = True
        if modality in ("video", "state", "language") and not name:  # nested form
            if not isinstance(value, dict):
                raise ValueError(f"observation.{key}: expected a map, got {type(value).__name__}")
            flat, entries = False, [(f"observation.{key}.{k}", v) for k, v in value.items()]
        elif modality in ("video", "state"):
            entries = [(f"observation.{key}", value)]
        elif modality != "action" and isinstance(value, (list, tuple)):  # a flat language key
            modality, entries = "language", [(f"observation.{key}", value)]
        else:
            continue
        for where, v in entries:
            if modality == "video":
                batch[where] = _check_array(v, where, np.uint8, 5)
                if v.shape[-1] != 3:
                    raise ValueError(f"{where}: expected 3 RGB channels last, got shape {v.shape}")
            elif modality == "state":
                batch[where] = _check_array(v, where, np.float32, 3)
            else:
                batch[where] = _check_language(v, where, flat)
    if len(set(batch.values())) > 1:
        sizes = ", ".join(f"{k}={b}" for k, b in batch.items())
        raise ValueError(f"observation: batch sizes disagree ({sizes})")


class PolicyClient:
    """ZMQ REQ client of a GR00T policy server (upstream or fleetserve)."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = 5555,
        timeout_ms: int | None = 15000,
        api_token: str | None = None,
        strict: bool = False,
        embodiment_tag: str | None = None,
        server_public_key: str | bytes | None = None,
        client_keys: tuple[str | bytes, str | bytes] | None = None,
        *,
        context: zmq.Context | None = None,
        model_id: str | None = None,
    ) -> None:
        self._socket: zmq.Socket | None = None
        self._closed = False
        self.host = host
        self.port = port
        self.timeout_ms = timeout_ms
        self.api_token = api_token
        self.strict = strict
        self.embodiment_tag = embodiment_tag
        self.model_id = model_id  # fleetserve: which fine-tune of the embodiment answers (None: the port's default)
        self._ipv6 = ":" in host
        self._address = f"tcp://[{host.strip('[]')}]:{port}" if self._ipv6 else f"tcp://{host}:{port}"
        self._curve: tuple[bytes, bytes, bytes] | None = None
        if server_public_key is not None:
            if not zmq.has("curve"):
                raise RuntimeError("this libzmq has no CURVE support; cannot use server_public_key")
            # No client keys: an ephemeral pair still encrypts; the server decides whether it must know us.
            public, secret = client_keys if client_keys is not None else zmq.curve_keypair()
            self._curve = (
                _z85_key(server_public_key, "server_public_key"),
                _z85_key(public, "client_keys[0]"),
                _z85_key(secret, "client_keys[1]"),
            )
        elif client_keys is not None:
            raise ValueError("client_keys needs server_public_key (CURVE is keyed by the server's public key)")
        # The shared context: a fleet of clients in one process must not each spawn an I/O thread.
        self._context = context if context is not None else zmq.Context.instance()
        self._socket = self._new_socket()

    # -- socket lifecycle ------------------------------------------------------------------------------

    def _new_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self._curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self._curve[0])
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self._curve[1])
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve[2])
        sock.connect(self._address)
        return sock

    def _drop_socket(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close(linger=0)

    def _reset_socket(self) -> None:
        # A REQ socket that sent and got no reply refuses to send again; a new one (new identity) also
        # guarantees a late reply to the old request can never be read as the answer to the next one.
        self._drop_socket()
        if not self._closed:
            self._socket = self._new_socket()

    def close(self) -> None:
        """Close the socket (no lingering). Idempotent; the client cannot be used afterwards."""
        self._closed = True
        self._drop_socket()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn zmq down already
            pass

    # -- transport -------------------------------------------------------------------------------------

    def _wait(self, sock: zmq.Socket, event: int, deadline: float | None) -> bool:
        if deadline is None:
            return bool(sock.poll(None, event))
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        return bool(sock.poll(remaining_ms, event))

    def _roundtrip(self, payload: bytes) -> bytes | memoryview:
        if self._closed:
            raise RuntimeError("PolicyClient is closed")
        if self._socket is None:
            self._socket = self._new_socket()
        sock = self._socket
        deadline = None if self.timeout_ms is None else time.monotonic() + self.timeout_ms / 1000
        try:
            if not self._wait(sock, zmq.POLLOUT, deadline):
                raise PolicyTimeoutError(f"{self._address}: could not send within {self.timeout_ms} ms")
            sock.send(payload, zmq.NOBLOCK, copy=False)
            if not self._wait(sock, zmq.POLLIN, deadline):
                raise PolicyTimeoutError(f"{self._address}: no reply within {self.timeout_ms} ms")
            frame = sock.recv(zmq.NOBLOCK, copy=False)
        except BaseException:
            # Timeout, Ctrl-C or a socket error mid-request: the REQ state machine is stuck either way.
            self._reset_socket()
            raise
        return frame.buffer

    def call_endpoint(self, endpoint: str, data: dict[str, Any] | None = None, requires_input: bool = True) -> Any:
        """Send one request (upstream's signature) and return the decoded reply; raise on an error reply."""
        request = build_request(endpoint, data, requires_input=requires_input, api_token=self.api_token,
                                embodiment_tag=self.embodiment_tag, model_id=self.model_id)
        reply = unpackb(self._roundtrip(packb(request)))
        error = reply_error(reply)
        if error is not None:
            reason = reply.get("reason")
            raise PolicyServerError(*error, reason=reason if isinstance(reason, str) else None)
        return reply

    # -- endpoints ---------------------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when the server answers `{"status": "ok"}`; False on timeout, error or a garbled reply."""
        try:
            reply = self.call_endpoint("ping", requires_input=False)
        except (PolicyTimeoutError, PolicyServerError, CodecError, zmq.ZMQError):
            return False
        return isinstance(reply, dict) and reply.get("status") == "ok"

    def get_action(
        self, observation: dict[str, Any], options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.strict:
            check_observation(observation)
        reply = self.call_endpoint("get_action", {"observation": observation, "options": options})
        if isinstance(reply, (list, tuple)) and len(reply) == 2:
            return reply[0], reply[1]
        if isinstance(reply, dict):  # an N1.5 server answers the action dict alone
            return reply, {}
        raise CodecError("reply", f"expected a 2-list [action, info], got {type(reply).__name__}")

    def reset(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.call_endpoint("reset", {"options": options})

    def get_modality_config(self) -> dict[str, ModalityConfig]:
        reply = self.call_endpoint("get_modality_config", requires_input=False)
        if not isinstance(reply, dict):
            raise CodecError("reply", f"expected a map of ModalityConfig, got {type(reply).__name__}")
        return reply

    def info(self) -> dict[str, Any]:
        return self.call_endpoint("info", requires_input=False)

    def kill_server(self) -> Any:
        """Upstream's `kill`; a fleetserve server refuses it, and that error is raised here."""
        return self.call_endpoint("kill", requires_input=False)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"PolicyClient({self._address}, timeout_ms={self.timeout_ms}, {state})"
