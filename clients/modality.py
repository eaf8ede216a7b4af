"""Wire types of the GR00T policy protocol: ModalityConfig and ActionConfig.

They live in `clients/` because a robot needs them without torch; `policy` re-exports them. Field names,
enum names and JSON shapes follow GR00T N1.6 (`ModalityConfig.to_json()` / `ActionConfig` with enums written
by NAME), so a reply of ours decodes into the same values an upstream client expects.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class ActionRepresentation(str, enum.Enum):
    RELATIVE = "relative"
    DELTA = "delta"
    ABSOLUTE = "absolute"


class ActionType(str, enum.Enum):
    EEF = "eef"
    NON_EEF = "non_eef"


class ActionFormat(str, enum.Enum):
    DEFAULT = "default"
    XYZ_ROT6D = "xyz+rot6d"
    XYZ_ROTVEC = "xyz+rotvec"


def _enum_by_name(enum_cls: type[enum.Enum], value: Any, field_name: str) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        # Upstream writes enums by NAME; accept the value spelling too, case-insensitively.
        for member in enum_cls:
            if value.upper() == member.name or value.lower() == str(member.value):
                return member
    names = "|".join(m.name for m in enum_cls)
    raise ValueError(f"{field_name}: expected one of {names}, got {value!r}")


@dataclass(frozen=True)
class ActionConfig:
    rep: ActionRepresentation = ActionRepresentation.ABSOLUTE
    type: ActionType = ActionType.NON_EEF
    format: ActionFormat = ActionFormat.DEFAULT
    state_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rep": self.rep.name, "type": self.type.name, "format": self.format.name, "state_key": self.state_key}

    @classmethod
    def from_json(cls, data: Any, where: str = "action_config") -> "ActionConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a map, got {type(data).__name__}")
        state_key = data.get("state_key")
        if state_key is not None and not isinstance(state_key, str):
            raise ValueError(f"{where}.state_key: expected a string or null, got {type(state_key).__name__}")
        return cls(
            rep=_enum_by_name(ActionRepresentation, data.get("rep", "ABSOLUTE"), f"{where}.rep"),
            type=_enum_by_name(ActionType, data.get("type", "NON_EEF"), f"{where}.type"),
            format=_enum_by_name(ActionFormat, data.get("format", "DEFAULT"), f"{where}.format"),
            state_key=state_key,
        )


def _str_list(value: Any, where: str, nullable: bool) -> list[str] | None:
    if value is None and nullable:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        expected = "a list of strings" + (" or null" if nullable else "")
        raise ValueError(f"{where}: expected {expected}, got {value!r:.80}")
    return list(value)


@dataclass(frozen=True)
class ModalityConfig:
    """Which keys a modality has and which time offsets (`delta_indices`) the model reads or writes."""

    delta_indices: list[int]
    modality_keys: list[str]
    sin_cos_embedding_keys: list[str] | None = None
    mean_std_embedding_keys: list[str] | None = None
    action_configs: list[ActionConfig] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def horizon(self) -> int:
        return len(self.delta_indices)

    def to_json(self) -> dict[str, Any]:
        out = {
            "delta_indices": list(self.delta_indices),
            "modality_keys": list(self.modality_keys),
            "sin_cos_embedding_keys": self.sin_cos_embedding_keys,
            "mean_std_embedding_keys": self.mean_std_embedding_keys,
            "action_configs": None if self.action_configs is None else [a.to_json() for a in self.action_configs],
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "modality_config") -> "ModalityConfig":
        if isinstance(data, (str, bytes)):  # N1.5 sent as_json as a JSON string
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ValueError(f"{where}: as_json is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a map, got {type(data).__name__}")
        deltas = data.get("delta_indices")
        if not isinstance(deltas, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in deltas):
            raise ValueError(f"{where}.delta_indices: expected a list of ints, got {deltas!r:.80}")
        actions = data.get("action_configs")
        if actions is not None:
            if not isinstance(actions, (list, tuple)):
                raise ValueError(f"{where}.action_configs: expected a list or null, got {type(actions).__name__}")
            actions = [ActionConfig.from_json(a, f"{where}.action_configs[{i}]") for i, a in enumerate(actions)]
        known = {"delta_indices", "modality_keys", "sin_cos_embedding_keys", "mean_std_embedding_keys", "action_configs"}
        return cls(
            delta_indices=list(deltas),
            modality_keys=_str_list(data.get("modality_keys"), f"{where}.modality_keys", nullable=False),
            sin_cos_embedding_keys=_str_list(data.get("sin_cos_embedding_keys"), f"{where}.sin_cos_embedding_keys", True),
            mean_std_embedding_keys=_str_list(data.get("mean_std_embedding_keys"), f"{where}.mean_std_embedding_keys", True),
            action_configs=actions,
            extra={k: v for k, v in data.items() if k not in known},
        )


MODALITIES = ("video", "state", "action", "language")
