"""Upstream GR00T clients of three generations, re-implemented from NVIDIA/Isaac-GR00T's public sources for the
conformance suite (NVIDIA's `gr00t` package needs CUDA and its model stack, so it cannot be installed here: these
stand in for it). Each reproduces its generation's wire behaviour: request keys, array encoding, its own decode
path (including how it rebuilds a ModalityConfig), how it detects an error reply and its socket options. Written
from reading the sources, not copied.

Two things are the harness's, not upstream's, and change nothing on the wire: every receive waits on a poll with
a deadline (upstream blocks forever, which would hang a failing test), and `close()` never lingers.
`last_reply` keeps the decoded reply so the suite can look at fields the client itself ignores (an error's kind).
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pydantic
import zmq

HARNESS_TIMEOUT_MS = 60_000


class _ReqClient:
    """The REQ socket every generation opens: its own zmq.Context, no socket options at all (no LINGER, no
    RCVTIMEO/SNDTIMEO: upstream stores timeout_ms but never sets it)."""

    def __init__(self, host: str = "localhost", port: int = 5555, timeout_ms: int = 15000, api_token: str | None = None):
        self.context = zmq.Context()
        self.host, self.port, self.timeout_ms, self.api_token = host, port, timeout_ms, api_token
        self.last_reply: Any = None
        self._init_socket()

    def _init_socket(self) -> None:
        self.socket = self.context.socket(zmq.REQ)
        self.socket.connect(f"tcp://{self.host}:{self.port}")

    def _request(self, endpoint: str, data: Any, requires_input: bool) -> dict:
        request: dict = {"endpoint": endpoint}
        if requires_input:
            request["data"] = data
        if self.api_token:  # upstream tests truthiness: an empty token is not sent
            request["api_token"] = self.api_token
        return request

    def _exchange(self, payload: bytes) -> bytes:
        self.socket.send(payload)
        if not self.socket.poll(HARNESS_TIMEOUT_MS, zmq.POLLIN):  # the harness's bound, see the module docstring
            raise TimeoutError(f"no reply from port {self.port} within {HARNESS_TIMEOUT_MS} ms")
        return self.socket.recv()

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


# ---------------------------------------------------------------------------------------------------------
# N1.5


class N15ModalityConfig(pydantic.BaseModel):
    """N1.5's ModalityConfig (gr00t/data/dataset.py): a pydantic model of two fields; extra fields are ignored."""

    delta_indices: list[int]
    modality_keys: list[str]


class N15Client(_ReqClient):
    """N1.5's `RobotInferenceClient` / `ExternalRobotInferenceClient`.

    Read from NVIDIA/Isaac-GR00T gr00t/eval/service.py @ 0a015f63932c6d1a0b141785cb350547d24ad0d4 (MsgSerializer,
    BaseInferenceClient), gr00t/eval/robot.py @ 6d8a53bfc08056b950611b244881679c49091935 (the client's endpoints)
    and gr00t/model/policy.py @ 16c4f7b3cbeeca2dc29ad9982228817297871a0e (what the server did with `data`).
    - arrays out as `{"__ndarray_class__": True, "as_npy": np.save bytes}`; msgpack's defaults otherwise;
    - the observation itself is `data` (flat keys; one environment may leave out B; its example sends float64
      states); the reply is the action dict alone;
    - decode hook: `__ModalityConfig_class__` -> `ModalityConfig(**json.loads(as_json))` (a JSON string),
      `__ndarray_class__` -> `np.load(..., allow_pickle=False)`;
    - error: `"error" in response` -> RuntimeError("Server error: ...").
    """

    @staticmethod
    def _encode(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, obj, allow_pickle=False)
            return {"__ndarray_class__": True, "as_npy": buf.getvalue()}
        return obj

    @staticmethod
    def _decode(obj: dict) -> Any:
        if "__ModalityConfig_class__" in obj:
            obj = N15ModalityConfig(**json.loads(obj["as_json"]))
        if "__ndarray_class__" in obj:  # (a ModalityConfig model answers `in` through its fields: never matches)
            obj = np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False)
        return obj

    def call_endpoint(self, endpoint: str, data: Any = None, requires_input: bool = True) -> Any:
        payload = msgpack.packb(self._request(endpoint, data, requires_input), default=self._encode)
        response = msgpack.unpackb(self._exchange(payload), object_hook=self._decode)
        self.last_reply = response
        if "error" in response:
            raise RuntimeError(f"Server error: {response['error']}")
        return response

    def ping(self) -> bool:
        try:
            self.call_endpoint("ping", requires_input=False)
            return True
        except zmq.error.ZMQError:
            self._init_socket()
            return False

    def kill_server(self) -> None:
        self.call_endpoint("kill", requires_input=False)

    def get_action(self, observations: dict[str, Any]) -> dict[str, Any]:
        return self.call_endpoint("get_action", observations)

    def get_modality_config(self) -> dict[str, N15ModalityConfig]:
        return self.call_endpoint("get_modality_config", requires_input=False)


# ---------------------------------------------------------------------------------------------------------
# N1.6


@dataclasses.dataclass
class N16ModalityConfig:
    """N1.6's ModalityConfig (gr00t/data/types.py): a dataclass, so an unknown field is a TypeError."""

    delta_indices: list[int]
    modality_keys: list[str]
    sin_cos_embedding_keys: list[str] | None = None
    mean_std_embedding_keys: list[str] | None = None
    action_configs: list[Any] | None = None


class N16Client(_ReqClient):
    """N1.6's `gr00t.policy.server_client.PolicyClient`.

    Read from NVIDIA/Isaac-GR00T gr00t/policy/server_client.py @ 38624dff3f88a4a4596f8c78475abcb8b92e24aa (the
    client is the same in @ ade260e6d08b629dad7cea33910113efc2e6752a, 2026).
    - request `{"endpoint", "data": {"observation", "options"}, "api_token"}`; arrays as `.npy` bytes;
    - decode hook: `__ModalityConfig_class__` -> `ModalityConfig(**as_json)` (a map), `__ndarray_class__` ->
      `np.load(..., allow_pickle=False)`; a raw b"ERROR" reply raises;
    - error: `isinstance(response, dict) and "error" in response` -> RuntimeError("Server error: ...");
    - get_action returns `tuple(response)`: `(action, info)`.
    """

    _modality_config = N16ModalityConfig

    @staticmethod
    def _encode(obj: Any) -> Any:
        return N15Client._encode(obj)

    def _decode(self, obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj
        if "__ModalityConfig_class__" in obj:
            return self._modality_config(**obj["as_json"])
        if "__ndarray_class__" in obj:
            return np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False)
        return obj

    def _pack(self, request: dict) -> bytes:
        return msgpack.packb(request, default=self._encode)

    def call_endpoint(self, endpoint: str, data: Any = None, requires_input: bool = True) -> Any:
        message = self._exchange(self._pack(self._request(endpoint, data, requires_input)))
        if message == b"ERROR":
            raise RuntimeError("Server error. Make sure we are running the correct policy server.")
        response = msgpack.unpackb(message, object_hook=self._decode)
        self.last_reply = response
        if isinstance(response, dict) and "error" in response:
            raise RuntimeError(f"Server error: {response['error']}")
        return response

    def ping(self) -> bool:
        try:
            self.call_endpoint("ping", requires_input=False)
            return True
        except zmq.error.ZMQError:
            self._init_socket()
            return False

    def kill_server(self) -> None:
        self.call_endpoint("kill", requires_input=False)

    def get_action(self, observation: dict[str, Any], options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        return tuple(self.call_endpoint("get_action", {"observation": observation, "options": options}))

    def reset(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.call_endpoint("reset", {"options": options})

    def get_modality_config(self) -> dict[str, N16ModalityConfig]:
        return self.call_endpoint("get_modality_config", requires_input=False)


# ---------------------------------------------------------------------------------------------------------
# N1.7


class N17Client(N16Client):
    """N1.7's PolicyClient: N1.6's client with the msgpack-numpy codec.

    The versions of NVIDIA/Isaac-GR00T gr00t/policy/server_client.py that could be read here (38624dff, ade260e6)
    still write `.npy`; the N1.7 differences are taken from public descriptions of N1.7's MsgSerializer and of
    clients ported from it (no N1.7 commit could be read, so none is cited): arrays are written by the real
    `msgpack_numpy.encode` (`{b"nd", b"type", b"kind", b"shape", b"data"}`, bytes keys), replies are read with
    `msgpack_numpy.decode` and also in the N1.6 `.npy` form, and ModalityConfig comes as `__ModalityConfig__`
    (or N1.6's `__ModalityConfig_class__`) with `as_json` a map. Same envelope, error check and socket as N1.6.
    """

    def _pack(self, request: dict) -> bytes:
        return msgpack.packb(request, default=msgpack_numpy.encode)

    def _decode(self, obj: Any) -> Any:
        obj = msgpack_numpy.decode(obj)
        if not isinstance(obj, dict):
            return obj
        for marker in ("__ModalityConfig__", "__ModalityConfig_class__"):
            if marker in obj:
                return self._modality_config(**obj["as_json"])
        if "__ndarray_class__" in obj:
            return np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False)
        return obj
