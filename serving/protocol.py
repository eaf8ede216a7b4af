"""The GR00T request envelope and its observation forms, as robots send them.

Three generations reach one server:
- N1.6/N1.7: `{"endpoint": "get_action", "data": {"observation": obs, "options": ...}}` -> `[action, info]`;
  `obs` is nested (`{"video": {cam: arr}, ...}`) or flat as the simulation wrapper sends it
  (`{"video.cam": arr, "state.key": arr, "<language key>": [str] * B}`), and flat in means flat out
  (`{"action.key": arr}`).
- N1.5: the flat observation itself is `data`, and the action dict alone comes back.
The embodiment is not part of upstream's protocol; we add an optional top-level `"embodiment_tag"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

ENDPOINTS = ("ping", "get_action", "reset", "get_modality_config", "info", "kill")
UNAUTHORIZED = "Unauthorized: Invalid API token"  # upstream's exact text; clients may match on it


class RequestError(ValueError):
    """A request the server refuses; the message goes back to the robot as `{"error": message}`.

    `kind` names the class of fault for metrics: bad_request, unauthorized, overloaded, deadline, policy.
    """

    def __init__(self, message: str, kind: str = "bad_request"):
        super().__init__(message)
        self.kind = kind


class ObservationForm(str, Enum):
    NESTED = "nested"
    FLAT = "flat"  # N1.6 simulation wrapper: flat keys inside data["observation"]
    N15 = "n1.5"  # N1.5: flat keys as data itself, action dict alone back


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


@dataclass
class ActionRequest:
    observation: dict[str, Any]  # always nested
    options: dict[str, Any] | None
    form: ObservationForm
    unbatched: bool  # N1.5 allowed a single observation without B; its reply drops B again
    samples: int


def _is_flat(obs: dict) -> bool:
    return any(isinstance(k, str) and (k.startswith("video.") or k.startswith("state.")) for k in obs)


def _batch_size(nested: dict) -> int:
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


def _flat_to_nested(flat: dict[str, Any], batched: bool) -> dict[str, Any]:
    nested: dict[str, dict[str, Any]] = {"video": {}, "state": {}, "language": {}}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise RequestError(f"observation: keys must be strings, got {type(key).__name__}")
        modality, _, name = key.partition(".")
        if modality in ("video", "state") and name:
            if not batched and isinstance(value, np.ndarray):
                value = value[np.newaxis]
            nested[modality][name] = value
        elif modality == "action":
            continue  # ground-truth actions some wrappers leave in; not an input
        else:
            # Anything else is a language key (e.g. "annotation.human.task_description"): B strings.
            if isinstance(value, str):
                value = [value]
            if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
                value = [[s] for s in value]
            nested["language"][key] = value
    return nested


def parse_action_request(data: dict[str, Any]) -> ActionRequest:
    if "observation" in data:
        obs = data["observation"]
        if not isinstance(obs, dict):
            raise RequestError(f"data.observation: expected a map, got {type(obs).__name__}")
        options = parse_options(data.get("options"))
        if _is_flat(obs):
            nested = _flat_to_nested(obs, batched=True)
            return ActionRequest(nested, options, ObservationForm.FLAT, False, _batch_size(nested))
        return ActionRequest(obs, options, ObservationForm.NESTED, False, _batch_size(obs))
    if _is_flat(data):
        # N1.5 sent one environment without B: states (T, D), video (T, H, W, 3).
        batched = not any(
            isinstance(v, np.ndarray) and v.ndim == 2 for k, v in data.items() if isinstance(k, str) and k.startswith("state.")
        )
        nested = _flat_to_nested(data, batched)
        return ActionRequest(nested, None, ObservationForm.N15, not batched, _batch_size(nested))
    raise RequestError(
        "data: expected {'observation': ..., 'options': ...} or an N1.5 flat observation "
        f"('video.<cam>', 'state.<key>' keys), got keys {sorted(map(str, data))[:8]}"
    )


def format_action_reply(req: ActionRequest, action: dict[str, np.ndarray], info: dict[str, Any]) -> Any:
    if req.form is ObservationForm.NESTED:
        return [action, info]
    flat = {f"action.{k}": (v[0] if req.unbatched else v) for k, v in action.items()}
    return flat if req.form is ObservationForm.N15 else [flat, info]
