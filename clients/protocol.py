"""The GR00T wire protocol, written once: the robot client, the ingress, the serial reference and the policy use it.

numpy only (no msgpack, no zmq): what travels, not how bytes move. `clients.codec` turns these values into bytes.

- Endpoints: ping, get_action, reset, get_modality_config, kill (upstream's), info (ours).
- Request envelope: `{"endpoint": str, "data": map, "api_token": str, "embodiment_tag": str}`; `data` only for
  endpoints with input, `api_token` only when the client has one, a missing `endpoint` means get_action, and
  `embodiment_tag` (not upstream's) picks one of the embodiments a fleet serves.
- Client generations: N1.5 sends the flat observation itself as `data` and wants the action dict alone back and
  `ModalityConfig.as_json` as a JSON string; N1.6 and N1.7 send `{"observation": obs, "options": ...}`, want
  `[action, info]`, and read `as_json` as a map. N1.6 writes arrays as `.npy` bytes, N1.7 (and every client built
  on the `msgpack-numpy` package) in msgpack-numpy form. The two `get_modality_config` requests are identical on
  the wire, so a port is told which generation it serves (`PortProtocol`).
- Observation forms: nested (`{"video": {cam: arr}, "state": {key: arr}, "language": {key: [[str]] * B}}`), flat
  as upstream's simulation wrapper sends it (`"video.<cam>"`, `"state.<key>"`, the language key holding B
  strings; the reply's keys are `"action.<key>"`), and N1.5 (flat, as `data` itself, B optional).
- Errors: `{"error": message, "kind": ErrorKind}`, plus `"reason": Refusal` where a valid get_action got no
  action (refused early, expired, overloaded). Every client generation raises on a map reply holding `"error"`;
  `kind` and `reason` are ours and let tools sort errors without reading the message, which is for people.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

ENDPOINTS = ("ping", "get_action", "reset", "get_modality_config", "info", "kill")
ENDPOINTS_WITHOUT_INPUT = frozenset(("ping", "get_modality_config", "info", "kill"))
MODALITIES = ("video", "state", "language")
UNAUTHORIZED = "Unauthorized: Invalid API token"  # upstream's exact text; clients may match on it


class ErrorKind(str, enum.Enum):
    """What went wrong, as the `kind` of an error reply (and the outcome label of the server's metrics)."""

    BAD_REQUEST = "bad_request"  # the robot's message: fix the client
    UNAUTHORIZED = "unauthorized"  # wrong or missing api_token
    OVERLOADED = "overloaded"  # too many queued requests: retry later
    DEADLINE = "deadline"  # no answer within the request's deadline
    POLICY = "policy"  # the policy failed on a valid request
    REFUSED = "refused"  # a valid request this server never does (kill)
    INTERNAL = "internal"  # a bug of the server's

    def __str__(self) -> str:
        return self.value


ERROR_KINDS: tuple[str, ...] = tuple(k.value for k in ErrorKind)


class Refusal(str, enum.Enum):
    """Why a valid get_action got no action (the `reason` of its error reply): what the server's SLO metrics,
    its status page and the benchmarks count. Finer than ErrorKind; the message says the same for people."""

    OVERLOADED = "overloaded"  # the embodiment's queue was full: retry later
    REFUSED_EARLY = "refused_early"  # predicted to miss its deadline, so refused at once: resend a fresh observation
    EXPIRED_WAITING = "expired_waiting"  # admitted, then its deadline passed while it waited for a batch
    EXPIRED_ON_REPLICA = "expired_on_replica"  # its deadline passed while its batch was on (or on its way to) a replica

    def __str__(self) -> str:
        return self.value


class PortProtocol(str, enum.Enum):
    """Which client generations a port speaks (`ingress.ports[].protocol`)."""

    AUTO = "auto"  # N1.6, N1.7 and msgpack-numpy clients, each answered in its own array encoding
    N15 = "n1.5"  # N1.5 exactly: flat observation as data, action dict alone back, as_json a JSON string


class ArrayEncoding(str, enum.Enum):
    """How a message carries numpy arrays."""

    NPY = "npy"  # N1.6: {"__ndarray_class__": True, "as_npy": <np.save bytes>}
    MSGPACK_NUMPY = "msgpack-numpy"  # N1.7 and msgpack_numpy.encode: {b"nd", b"type", b"kind", b"shape", b"data"}


class ObservationForm(str, enum.Enum):
    NESTED = "nested"
    FLAT = "flat"  # upstream's simulation wrapper: flat keys inside data["observation"]
    N15 = "n1.5"  # N1.5: flat keys as data itself, action dict alone back


class RequestError(ValueError):
    """A request the server refuses; it goes back to the robot as `{"error": message, "kind": kind}` (and
    `"reason": reason` when it has one)."""

    def __init__(self, message: str, kind: ErrorKind | str = ErrorKind.BAD_REQUEST, reason: Refusal | None = None):
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.reason = reason


def error_reply(message: str, kind: ErrorKind | str, reason: Refusal | None = None) -> dict[str, str]:
    reply = {"error": message, "kind": ErrorKind(kind).value}
    if reason is not None:
        reply["reason"] = reason.value
    return reply


def reply_error(reply: Any) -> tuple[str, str | None] | None:
    """`(message, kind)` when `reply` is an error reply (kind None from servers that send none), else None."""
    if isinstance(reply, dict) and "error" in reply:
        kind = reply.get("kind")
        return str(reply["error"]), (kind if isinstance(kind, str) else None)
    return None


# ---------------------------------------------------------------------------------------------------------
# embodiment tags

_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_.+\-]*$")


def canonical_tag(tag: Any) -> str:
    """The lower-case canonical embodiment tag: "gr1", "GR1", "EmbodimentTag.GR1", " Unitree_G1 " and enum members
    whose value is a string (ours or NVIDIA's `EmbodimentTag`) all name one tag. Raises ValueError otherwise."""
    if isinstance(tag, enum.Enum):
        tag = tag.value
    if not isinstance(tag, str):
        raise ValueError(f"embodiment tag: expected a string, got {type(tag).__name__} {tag!r:.60}")
    text = tag.strip()
    if "." in text and text.split(".", 1)[0].lower() == "embodimenttag":
        text = text.split(".", 1)[1]
    low = text.lower()  # GR00T's EmbodimentTag names are its values upper-cased
    if not _TAG_RE.match(low):
        raise ValueError(
            f"embodiment tag: expected a name of letters, digits and _ . + - (e.g. gr1, unitree_g1), got {tag!r:.60}"
        )
    return low


# ---------------------------------------------------------------------------------------------------------
# requests


def build_request(
    endpoint: str,
    data: dict[str, Any] | None = None,
    *,
    requires_input: bool = True,
    api_token: str | None = None,
    embodiment_tag: str | None = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    """The request envelope, keyed as upstream's clients key it (`embodiment_tag` and `model_id` are ours)."""
    request: dict[str, Any] = {"endpoint": endpoint}
    if requires_input:
        request["data"] = data
    if api_token is not None:
        request["api_token"] = api_token
    if embodiment_tag is not None:
        request["embodiment_tag"] = embodiment_tag
    if model_id is not None:
        request["model_id"] = model_id
    return request


@dataclass
class Envelope:
    endpoint: str
    data: dict[str, Any]
    api_token: str | None
    embodiment_tag: str | None
    model_id: str | None = None  # ours, like embodiment_tag: which fine-tune of the embodiment answers


def _optional_str(msg: dict, key: str) -> str | None:
    value = msg.get(key)
    if value is None or isinstance(value, str):
        return value
    raise RequestError(f"{key}: expected a string, got {type(value).__name__}")


def parse_envelope(msg: Any) -> Envelope:
    if not isinstance(msg, dict):
        raise RequestError(f"request: expected a msgpack map with an 'endpoint', got {type(msg).__name__}")
    endpoint = msg.get("endpoint", "get_action")  # upstream: a missing endpoint means get_action
    if not isinstance(endpoint, str):
        raise RequestError(f"endpoint: expected a string, got {type(endpoint).__name__}")
    if endpoint not in ENDPOINTS:
        raise RequestError(f"endpoint: unknown endpoint {endpoint!r:.60}; expected one of {', '.join(ENDPOINTS)}")
    data = msg.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RequestError(f"data: expected a map, got {type(data).__name__}")
    return Envelope(
        endpoint, data, _optional_str(msg, "api_token"), _optional_str(msg, "embodiment_tag"), _optional_str(msg, "model_id")
    )


def parse_options(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise RequestError(f"options: expected a map or null, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------------
# observation forms


def is_flat(obs: Mapping) -> bool:
    return any(isinstance(k, str) and (k.startswith("video.") or k.startswith("state.")) for k in obs)


def to_flat(observation: Mapping[str, Any]) -> dict[str, Any]:
    """Nested -> flat: `video.<cam>`, `state.<key>`, and each language key holding B strings."""
    flat: dict[str, Any] = {}
    for cam, arr in observation.get("video", {}).items():
        flat[f"video.{cam}"] = arr
    for key, arr in observation.get("state", {}).items():
        flat[f"state.{key}"] = arr
    for key, texts in observation.get("language", {}).items():
        flat[key] = [t[0] if isinstance(t, (list, tuple)) else t for t in texts]
    return flat


def to_nested(flat: Mapping[str, Any], *, add_batch_axis: bool = False) -> dict[str, Any]:
    """Flat -> nested. Keys other than `video.*`, `state.*` and `action.*` are language keys (one string per
    sample); `action.*` (ground truth some wrappers leave in, or upstream's real-time chunking's previous chunk)
    goes to an `action` section, which the policy reads only for RTC. `add_batch_axis`: one environment
    without B, as N1.5 allowed."""
    nested: dict[str, dict[str, Any]] = {m: {} for m in MODALITIES}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise RequestError(f"observation: keys must be strings, got {type(key).__name__}")
        modality, _, name = key.partition(".")
        if modality in ("video", "state") and name:
            if add_batch_axis and isinstance(value, np.ndarray):
                value = value[np.newaxis]
            nested[modality][name] = value
        elif modality == "action" and name:
            nested.setdefault("action", {})[name] = value
        else:
            if isinstance(value, str):
                value = [value]
            if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
                value = [[s] for s in value]
            nested["language"][key] = value
    return nested


def batch_size(nested: Mapping[str, Any]) -> int:
    for modality in ("state", "video"):
        group = nested.get(modality)
        if isinstance(group, dict):
            for arr in group.values():
                if isinstance(arr, np.ndarray) and arr.ndim >= 1:
                    return int(arr.shape[0])
    lang = nested.get("language")
    if isinstance(lang, dict):
        for v in lang.values():
            if isinstance(v, (list, tuple)):
                return len(v)
    return 1


@dataclass
class ActionRequest:
    observation: dict[str, Any]  # always nested
    options: dict[str, Any] | None
    form: ObservationForm
    unbatched: bool  # N1.5 allowed one environment without B; its reply drops B again
    samples: int


def _n15_unbatched(obs: Mapping[str, Any]) -> bool:
    # N1.5's policy called an observation unbatched when any state key held fewer than 3 dimensions.
    return any(
        isinstance(k, str) and "state" in k and isinstance(v, np.ndarray) and v.ndim < 3 for k, v in obs.items()
    )


def _cast_float64_states(nested: dict[str, Any]) -> None:
    # N1.5's server accepted float64 states (its example client sends them) and ran them as float32.
    states = nested["state"]
    for key, arr in states.items():
        if isinstance(arr, np.ndarray) and arr.dtype.kind == "f" and arr.dtype.itemsize == 8:
            states[key] = arr.astype(np.float32)


def _parse_n15(data: dict[str, Any]) -> ActionRequest:
    unbatched = _n15_unbatched(data)
    nested = to_nested(data, add_batch_axis=unbatched)
    _cast_float64_states(nested)
    return ActionRequest(nested, None, ObservationForm.N15, unbatched, batch_size(nested))


def parse_action_request(data: dict[str, Any], protocol: PortProtocol | str = PortProtocol.AUTO) -> ActionRequest:
    """The `data` of a get_action request, in whichever form its generation sends it."""
    if PortProtocol(protocol) is PortProtocol.N15:
        if not is_flat(data):
            raise RequestError(
                "data: this port speaks N1.5: expected the flat observation itself ('video.<cam>', 'state.<key>', "
                f"language keys), got keys {sorted(map(str, data))[:8]}"
            )
        return _parse_n15(data)
    if "observation" in data:
        obs = data["observation"]
        if not isinstance(obs, dict):
            raise RequestError(f"data.observation: expected a map, got {type(obs).__name__}")
        options = parse_options(data.get("options"))
        if is_flat(obs):
            nested = to_nested(obs)
            return ActionRequest(nested, options, ObservationForm.FLAT, False, batch_size(nested))
        return ActionRequest(obs, options, ObservationForm.NESTED, False, batch_size(obs))
    if is_flat(data):  # an N1.5 client on an auto port: answered as N1.5 answered it
        return _parse_n15(data)
    raise RequestError(
        "data: expected {'observation': ..., 'options': ...} or an N1.5 flat observation "
        f"('video.<cam>', 'state.<key>' keys), got keys {sorted(map(str, data))[:8]}"
    )


def format_action_reply(req: ActionRequest, action: dict[str, np.ndarray], info: dict[str, Any]) -> Any:
    """nested -> [action, info]; flat -> [{"action.<key>": ...}, info]; N1.5 -> {"action.<key>": ...} alone."""
    if req.form is ObservationForm.NESTED:
        return [action, info]
    # N1.5 squeezed every size-1 axis of an unbatched reply (np.squeeze), not only B: a 1-wide key loses D too.
    flat = {f"action.{k}": (np.squeeze(v) if req.unbatched else v) for k, v in action.items()}
    return flat if req.form is ObservationForm.N15 else [flat, info]


# ---------------------------------------------------------------------------------------------------------
# ModalityConfig on the wire

MODALITY_MARKER = "__ModalityConfig_class__"  # N1.5, N1.6
MODALITY_MARKER_N17 = "__ModalityConfig__"


def modality_config_n15(configs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """ModalityConfigs as N1.5 wrote them: `as_json` a JSON string of N1.5's two fields (N1.5's ModalityConfig
    had only delta_indices and modality_keys; its client reads it with `ModalityConfig(**json.loads(as_json))`)."""
    out = {}
    for modality, cfg in configs.items():
        fields = {"delta_indices": list(cfg.delta_indices), "modality_keys": list(cfg.modality_keys)}
        out[modality] = {MODALITY_MARKER: True, "as_json": json.dumps(fields)}
    return out
