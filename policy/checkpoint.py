"""GR00T checkpoint directories as NVIDIA's N1.6 and N1.7 code writes them, read without NVIDIA's code.

    config.json               model config (``model_type`` Gr00tN1d6 | Gr00tN1d7); N1.6 stores only the fields
                              that differ from its defaults
    model.safetensors         weights (or shards + model.safetensors.index.json), NVIDIA's parameter names
    processor_config.json     {"processor_class": ..., "processor_kwargs": {"modality_configs": {tag: {video,
                              state, action, language}}, image settings, normalisation switches, ...}}
    statistics.json           {tag: {"state"|"action": {key: {min,max,mean,std,q01,q99: [D]}},
                                     "relative_action": {key: {...: [steps][D]}}}}
    embodiment_id.json        {tag: row of the per-embodiment layers}

Trainer leftovers (``experiment_cfg/``, ``wandb_config.json``, optimiser states) are ignored. A state or action
key's dimension is the length of its statistics, as in NVIDIA's processor. Every error names the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.modality import ModalityConfig

from .embodiment import resolve_tag

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
STATISTICS_FILE = "statistics.json"
EMBODIMENT_ID_FILE = "embodiment_id.json"

MODALITIES = ("video", "state", "action", "language")
STAT_KEYS = ("min", "max", "mean", "std", "q01", "q99")
N1D6, N1D7 = "Gr00tN1d6", "Gr00tN1d7"
MODEL_TYPES = (N1D6, N1D7)

# NVIDIA's tag -> projector row mapping, used for tags a checkpoint's embodiment_id.json does not list (as
# NVIDIA's processor does).
DEFAULT_EMBODIMENT_IDS: dict[str, dict[str, int]] = {
    N1D6: {"robocasa_panda_omron": 13, "gr1": 20, "behavior_r1_pro": 24, "unitree_g1": 8, "libero_panda": 2,
           "oxe_google": 0, "oxe_widowx": 1, "oxe_droid": 16, "new_embodiment": 10},
    # NVIDIA's N1.7 projector rows (its processor's EMBODIMENT_TAG_TO_PROJECTOR_INDEX); tags of one robot share one.
    N1D7: {"simpler_env_google": 0, "simpler_env_widowx": 1, "libero_sim": 2, "new_embodiment": 10,
           "robocasa_panda_omron": 10, "robocasa_gr1_tabletop": 10, "unitree_g1_sonic": 11,
           "oxe_droid_relative_eef_relative_joint": 24, "real_g1_relative_eef_relative_joints": 25,
           "unitree_g1_full_body_with_waist_height_nav_cmd": 25, "real_r1_pro_sharpa_relative_eef": 26,
           "real_r1_pro_sharpa_relative_eef_human": 26, "real_r1_pro_sharpa_relative_eef_maxinsights": 26,
           "real_r1_pro_sharpa_relative_eef_mecka": 26, "xdof_relative_eef_relative_joint": 27,
           "xdof_relative_eef_relative_joint_subtask": 27},
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent. The message names the file."""


def _err(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {msg}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _err(path, "file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _err(path, f"cannot read ({exc})") from None
    except ValueError as exc:
        raise _err(path, f"not valid JSON ({exc})") from None


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@dataclass
class EmbodimentSpec:
    """What one embodiment of a checkpoint needs: its modality configs, dims, statistics and projector row."""

    tag: str
    modality_configs: dict[str, ModalityConfig]
    state_dims: dict[str, int]
    action_dims: dict[str, int]
    statistics: dict[str, dict[str, dict[str, list]]]  # {"state"|"action"|"relative_action": {key: stats}}
    embodiment_id: int

    @property
    def video_keys(self) -> list[str]:
        return list(self.modality_configs["video"].modality_keys)

    @property
    def state_keys(self) -> list[str]:
        return list(self.modality_configs["state"].modality_keys)

    @property
    def action_keys(self) -> list[str]:
        return list(self.modality_configs["action"].modality_keys)

    @property
    def language_keys(self) -> list[str]:
        return list(self.modality_configs["language"].modality_keys)

    @property
    def action_horizon(self) -> int:
        return len(self.modality_configs["action"].delta_indices)


@dataclass
class CheckpointInfo:
    """The JSON side of a checkpoint directory (the weights are read by the model's loader)."""

    path: Path
    config: dict[str, Any]
    processor_kwargs: dict[str, Any]
    statistics: dict[str, Any]
    embodiment_ids: dict[str, int]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def tags(self) -> list[str]:
        return list(self.processor_kwargs.get("modality_configs", {}))

    def embodiment(self, tag: Any) -> EmbodimentSpec:
        """The validated spec of one embodiment; an unknown tag fails listing the checkpoint's tags."""
        canonical = resolve_tag(tag)
        if canonical not in self.processor_kwargs["modality_configs"]:
            raise CheckpointError(
                f"embodiment tag {canonical!r} is not in checkpoint {self.path}; it holds: "
                f"{', '.join(sorted(self.tags)) or '(none)'} (from {self.path / PROCESSOR_CONFIG_FILE})"
            )
        return _parse_embodiment(self, canonical)


def _stat_values(values: Any, where: str, path: Path) -> tuple[int, int | None]:
    """(D, steps or None) of a statistics entry: [D] numbers or [steps][D] numbers, all finite."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(values, list) and values and all(finite(v) for v in values):
        return len(values), None
    if (isinstance(values, list) and values and all(isinstance(r, list) and r for r in values)
            and len({len(r) for r in values}) == 1 and all(finite(v) for r in values for v in r)):
        return len(values[0]), len(values)
    raise _err(path, f"{where}: expected a list of finite numbers (or a list of such lists), got {str(values)[:60]}")


def _parse_embodiment(info: CheckpointInfo, tag: str) -> EmbodimentSpec:
    pc_path = info.path / PROCESSOR_CONFIG_FILE
    st_path = info.path / STATISTICS_FILE
    raw = info.processor_kwargs["modality_configs"][tag]
    where = f"processor_kwargs.modality_configs.{tag}"
    if not isinstance(raw, dict):
        raise _err(pc_path, f"{where}: expected a map of video/state/action/language")
    mcs: dict[str, ModalityConfig] = {}
    for modality in MODALITIES:
        if modality not in raw:
            raise _err(pc_path, f"missing key '{where}.{modality}'")
        try:
            mcs[modality] = ModalityConfig.from_json(raw[modality], f"{where}.{modality}")
        except ValueError as exc:
            raise _err(pc_path, str(exc)) from None
    if len(mcs["language"].delta_indices) != 1 or len(mcs["language"].modality_keys) != 1:
        raise _err(pc_path, f"{where}.language: expected exactly one key and one delta index (as GR00T reads it)")
    if not mcs["state"].delta_indices or not mcs["action"].delta_indices:
        raise _err(pc_path, f"{where}: state and action need at least one delta index")
    acfgs = mcs["action"].action_configs
    if acfgs is not None and len(acfgs) != len(mcs["action"].modality_keys):
        raise _err(pc_path, f"{where}.action: {len(acfgs)} action_configs for {len(mcs['action'].modality_keys)} keys")

    tag_stats = info.statistics.get(tag)
    if not isinstance(tag_stats, dict):
        raise _err(st_path, f"missing key '{tag}' (statistics of embodiment {tag!r})")
    stats: dict[str, dict[str, dict[str, list]]] = {}
    dims: dict[str, dict[str, int]] = {"state": {}, "action": {}}
    for kind in ("state", "action", "relative_action"):
        section = tag_stats.get(kind)
        if section is None:
            if kind == "relative_action":
                continue
            raise _err(st_path, f"missing key '{tag}.{kind}'")
        if not isinstance(section, dict):
            raise _err(st_path, f"{tag}.{kind}: expected a map of key -> statistics")
        keys = mcs["state" if kind == "state" else "action"].modality_keys
        stats[kind] = {}
        for key in keys if kind != "relative_action" else [k for k in section if k in keys]:
            entry = section.get(key)
            if not isinstance(entry, dict):
                raise _err(st_path, f"missing key '{tag}.{kind}.{key}'")
            shape = None
            for sk in STAT_KEYS:
                if sk not in entry:
                    raise _err(st_path, f"missing key '{tag}.{kind}.{key}.{sk}'")
                got = _stat_values(entry[sk], f"{tag}.{kind}.{key}.{sk}", st_path)
                if shape is not None and got != shape:
                    def describe(sh: tuple[int, int | None]) -> str:
                        return f"{sh[0]} values" if sh[1] is None else f"{sh[1]} rows of {sh[0]} values"

                    raise _err(st_path, f"{tag}.{kind}.{key}.{sk}: {describe(got)}, the other statistics of "
                                        f"'{key}' have {describe(shape)}")
                shape = got
            if kind != "relative_action":
                if shape[1] is not None:
                    raise _err(st_path, f"{tag}.{kind}.{key}: expected one value per dimension, got per-step rows")
                dims[kind][key] = shape[0]
            elif shape[0] != dims["action"][key]:
                raise _err(st_path, f"{tag}.relative_action.{key}: {shape[0]} dims, its action has {dims['action'][key]}")
            stats[kind][key] = {sk: entry[sk] for sk in STAT_KEYS}

    ids = dict(DEFAULT_EMBODIMENT_IDS.get(info.model_type, {}))
    ids.update(info.embodiment_ids)
    if tag not in ids:
        raise _err(info.path / EMBODIMENT_ID_FILE, f"missing key '{tag}' (no projector row for the embodiment)")
    eid = ids[tag]
    if not isinstance(eid, int) or isinstance(eid, bool) or eid < 0:
        raise _err(info.path / EMBODIMENT_ID_FILE, f"{tag}: expected a non-negative int, got {eid!r}")
    return EmbodimentSpec(tag, mcs, dims["state"], dims["action"], stats, eid)


def check_directory(path: str | os.PathLike) -> Path:
    """The directory as a Path if it looks like a checkpoint (has config.json and weights); else CheckpointError."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise CheckpointError(f"not a checkpoint directory: {p} (does not exist)")
    if not p.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {p} (not a directory)")
    if not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"not a checkpoint directory: {p} (no {CONFIG_FILE})")
    if not (p / WEIGHTS_FILE).is_file() and not (p / WEIGHTS_INDEX_FILE).is_file():
        raise _err(p / WEIGHTS_FILE, "file is missing (no model weights in the directory)")
    return p


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read and check the JSON files of a checkpoint directory (not the weights, not the tokenizer)."""
    p = check_directory(path)
    config = read_json(p / CONFIG_FILE)
    if not isinstance(config, dict):
        raise _err(p / CONFIG_FILE, "expected a JSON object")
    if config.get("model_type") not in MODEL_TYPES:
        raise _err(
            p / CONFIG_FILE,
            f"model_type is {config.get('model_type')!r}; expected one of {', '.join(MODEL_TYPES)} (GR00T N1.6 / N1.7 "
            "checkpoints as NVIDIA writes them)",
        )
    pc = read_json(p / PROCESSOR_CONFIG_FILE)
    kwargs = pc.get("processor_kwargs") if isinstance(pc, dict) else None
    if not isinstance(kwargs, dict):
        raise _err(p / PROCESSOR_CONFIG_FILE, "missing key 'processor_kwargs' (a map)")
    mcs = kwargs.get("modality_configs")
    if not isinstance(mcs, dict) or not mcs:
        raise _err(p / PROCESSOR_CONFIG_FILE, "processor_kwargs.modality_configs: expected a non-empty map of tag -> configs")
    stats = read_json(p / STATISTICS_FILE)
    if not isinstance(stats, dict):
        raise _err(p / STATISTICS_FILE, "expected a JSON object")
    ids_path = p / EMBODIMENT_ID_FILE
    ids = read_json(ids_path) if ids_path.is_file() else {}
    if not isinstance(ids, dict):
        raise _err(ids_path, "expected a JSON object")
    return CheckpointInfo(path=p, config=config, processor_kwargs=kwargs, statistics=stats, embodiment_ids=ids)


def modality_layout(path: str | os.PathLike, tag: str) -> tuple[list[str], dict[str, Any] | None]:
    """(the tags a checkpoint holds, the JSON modality configs of ``tag`` or None), from processor_config.json
    alone: what the serving config checks without torch."""
    pc = read_json(Path(path) / PROCESSOR_CONFIG_FILE)
    mcs = pc.get("processor_kwargs", {}).get("modality_configs", {}) if isinstance(pc, dict) else {}
    if not isinstance(mcs, dict):
        mcs = {}
    return sorted(mcs), mcs.get(tag)


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "EmbodimentSpec",
    "MODEL_TYPES",
    "check_directory",
    "modality_layout",
    "read_checkpoint",
    "read_json",
    "write_json",
]
