"""Checkpoint directory reader and writer helpers (GR00T N1.6 layout).

A checkpoint directory holds:

- ``config.json`` + ``model.safetensors`` (or shards + ``model.safetensors.index.json``): the model, written by
  ``save_pretrained``.
- ``processor_config.json``::

      {"processor_class": "FleetGr00tProcessor", "format_version": 1,
       "image_size": S, "max_text_length": L, "use_percentiles": false, "clip_outliers": true,
       "embodiments": {tag: {"modality_configs": {"video"|"state"|"action"|"language": ModalityConfig.to_json()},
                             "state_dims": {key: D}, "action_dims": {key: D}}},
       "fleet_demo": {...}            # only in demo checkpoints: preset, seed, embodiments}

- ``statistics.json``: ``{tag: {"state"|"action"|"relative_action": {key: {"min","max","mean","std","q01","q99":
  [D floats]}}}}`` (``relative_action`` optional: statistics of RELATIVE action keys, as upstream).
- ``embodiment_id.json``: ``{tag: index}`` (row of the per-embodiment state encoder / action decoder).
- tokenizer files: ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.

Every error names the file it is about, e.g. ``checkpoint /x/statistics.json: missing key 'gr1'`` or
``not a checkpoint directory: /x (no config.json)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.modality import ActionRepresentation, ModalityConfig

from .embodiment import resolve_tag

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
STATISTICS_FILE = "statistics.json"
EMBODIMENT_ID_FILE = "embodiment_id.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

MODALITIES = ("video", "state", "action", "language")
STAT_KEYS = ("min", "max", "mean", "std", "q01", "q99")
PROCESSOR_CLASS = "FleetGr00tProcessor"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent. The message names the file."""


def _err(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {msg}")


# ----------------------------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _err(path, "file is missing") from None
    except OSError as exc:
        raise _err(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _err(path, f"not valid JSON ({exc})") from None


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write deterministic JSON (sorted keys are NOT used: key order carries meaning for modality keys)."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Parsed view of a checkpoint
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EmbodimentSpec:
    """Everything the processor needs about one embodiment of a checkpoint (validated)."""

    tag: str
    modality_configs: dict[str, ModalityConfig]
    state_dims: dict[str, int]
    action_dims: dict[str, int]
    statistics: dict[str, dict[str, dict[str, list[float]]]]  # {"state"|"action"|"relative_action": {key: stats}}
    embodiment_id: int
    extra: dict[str, Any] = field(default_factory=dict)

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

    def encoded_state_dim(self) -> int:
        """Width of the concatenated normalised state (sin/cos keys count twice)."""
        sincos = set(self.modality_configs["state"].sin_cos_embedding_keys or ())
        return sum(d * (2 if k in sincos else 1) for k, d in self.state_dims.items())

    def total_action_dim(self) -> int:
        return sum(self.action_dims[k] for k in self.action_keys)


@dataclass
class CheckpointInfo:
    """The JSON side of a checkpoint directory (the weights are loaded by the model class)."""

    path: Path
    config: dict[str, Any]
    processor_config: dict[str, Any]
    statistics: dict[str, Any]
    embodiment_ids: dict[str, int]

    @property
    def tags(self) -> list[str]:
        return list(self.processor_config.get("embodiments", {}))

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def image_size(self) -> int:
        return int(self.processor_config["image_size"])

    @property
    def max_text_length(self) -> int:
        return int(self.processor_config.get("max_text_length", 64))

    @property
    def use_percentiles(self) -> bool:
        return bool(self.processor_config.get("use_percentiles", False))

    @property
    def clip_outliers(self) -> bool:
        return bool(self.processor_config.get("clip_outliers", True))

    def embodiment(self, tag: Any) -> EmbodimentSpec:
        """The validated spec of one embodiment; an unknown tag fails listing the checkpoint's tags."""
        canonical = resolve_tag(tag)
        if canonical not in self.processor_config.get("embodiments", {}):
            raise CheckpointError(
                f"embodiment tag {canonical!r} is not in checkpoint {self.path}; it holds: "
                f"{', '.join(sorted(self.tags)) or '(none)'} (from {self.path / PROCESSOR_CONFIG_FILE})"
            )
        return _parse_embodiment(self, canonical)


def _is_dim(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _parse_embodiment(info: CheckpointInfo, tag: str) -> EmbodimentSpec:
    pc_path = info.path / PROCESSOR_CONFIG_FILE
    st_path = info.path / STATISTICS_FILE
    id_path = info.path / EMBODIMENT_ID_FILE
    entry = info.processor_config["embodiments"][tag]
    where = f"embodiments.{tag}"
    if not isinstance(entry, dict):
        raise _err(pc_path, f"{where}: expected a map, got {type(entry).__name__}")
    raw_mc = entry.get("modality_configs")
    if not isinstance(raw_mc, dict):
        raise _err(pc_path, f"{where}.modality_configs: expected a map of video/state/action/language")
    mcs: dict[str, ModalityConfig] = {}
    for modality in MODALITIES:
        if modality not in raw_mc:
            raise _err(pc_path, f"missing key '{where}.modality_configs.{modality}'")
        try:
            mcs[modality] = ModalityConfig.from_json(raw_mc[modality], f"{where}.modality_configs.{modality}")
        except ValueError as exc:
            raise _err(pc_path, str(exc)) from None
    if len(mcs["language"].delta_indices) != 1 or not mcs["language"].modality_keys:
        raise _err(pc_path, f"{where}.modality_configs.language: expected >= 1 key and exactly 1 delta index")
    if not mcs["state"].delta_indices or not mcs["action"].delta_indices:
        raise _err(pc_path, f"{where}.modality_configs: state and action need at least one delta index")

    dims: dict[str, dict[str, int]] = {}
    for kind in ("state", "action"):
        raw = entry.get(f"{kind}_dims")
        if not isinstance(raw, dict):
            raise _err(pc_path, f"missing key '{where}.{kind}_dims' (a map of {kind} key -> dimension)")
        out = {}
        for key in mcs[kind].modality_keys:
            if key not in raw:
                raise _err(pc_path, f"missing key '{where}.{kind}_dims.{key}'")
            if not _is_dim(raw[key]):
                raise _err(pc_path, f"{where}.{kind}_dims.{key}: expected a positive int, got {raw[key]!r}")
            out[key] = int(raw[key])
        dims[kind] = out

    acfgs = mcs["action"].action_configs
    if acfgs is not None:
        if len(acfgs) != len(mcs["action"].modality_keys):
            raise _err(
                pc_path,
                f"{where}.modality_configs.action: {len(acfgs)} action_configs for "
                f"{len(mcs['action'].modality_keys)} modality_keys",
            )
        for key, ac in zip(mcs["action"].modality_keys, acfgs):
            if ac.rep == ActionRepresentation.ABSOLUTE:
                continue
            skey = ac.state_key or key
            if skey not in dims["state"]:
                raise _err(pc_path, f"{where}: action '{key}' is {ac.rep.name} to state '{skey}', not a state key")
            if dims["state"][skey] != dims["action"][key]:
                raise _err(
                    pc_path,
                    f"{where}: action '{key}' ({dims['action'][key]} dims) is {ac.rep.name} to state '{skey}' "
                    f"({dims['state'][skey]} dims); the dimensions must agree",
                )

    # statistics
    if tag not in info.statistics:
        raise _err(st_path, f"missing key '{tag}'")
    tag_stats = info.statistics[tag]
    if not isinstance(tag_stats, dict):
        raise _err(st_path, f"{tag}: expected a map, got {type(tag_stats).__name__}")
    stats: dict[str, dict[str, dict[str, list[float]]]] = {}
    for kind in ("state", "action", "relative_action"):
        if kind not in tag_stats:
            if kind == "relative_action":
                continue
            raise _err(st_path, f"missing key '{tag}.{kind}'")
        section = tag_stats[kind]
        if not isinstance(section, dict):
            raise _err(st_path, f"{tag}.{kind}: expected a map, got {type(section).__name__}")
        dim_of = dims["state"] if kind == "state" else dims["action"]
        keys = list(dim_of) if kind != "relative_action" else [k for k in section if k in dim_of]
        stats[kind] = {}
        for key in keys:
            if key not in section:
                raise _err(st_path, f"missing key '{tag}.{kind}.{key}'")
            kst = section[key]
            if not isinstance(kst, dict):
                raise _err(st_path, f"{tag}.{kind}.{key}: expected a map of min/max/mean/std/q01/q99")
            clean = {}
            for sk in STAT_KEYS:
                if sk not in kst:
                    raise _err(st_path, f"missing key '{tag}.{kind}.{key}.{sk}'")
                vals = kst[sk]
                ok = (
                    isinstance(vals, list)
                    and len(vals) == dim_of[key]
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
                )
                if not ok:
                    got = f"{len(vals)} values" if isinstance(vals, list) else type(vals).__name__
                    raise _err(st_path, f"{tag}.{kind}.{key}.{sk}: expected a list of {dim_of[key]} finite numbers, got {got}")
                clean[sk] = [float(v) for v in vals]
            stats[kind][key] = clean

    if tag not in info.embodiment_ids:
        raise _err(id_path, f"missing key '{tag}'")
    eid = info.embodiment_ids[tag]
    if not isinstance(eid, int) or isinstance(eid, bool) or eid < 0:
        raise _err(id_path, f"{tag}: expected a non-negative int, got {eid!r}")

    extra = {k: v for k, v in entry.items() if k not in ("modality_configs", "state_dims", "action_dims")}
    return EmbodimentSpec(
        tag=tag,
        modality_configs=mcs,
        state_dims=dims["state"],
        action_dims=dims["action"],
        statistics=stats,
        embodiment_id=int(eid),
        extra=extra,
    )


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
    pc = read_json(p / PROCESSOR_CONFIG_FILE)
    if not isinstance(pc, dict):
        raise _err(p / PROCESSOR_CONFIG_FILE, "expected a JSON object")
    for key in ("image_size", "embodiments"):
        if key not in pc:
            raise _err(p / PROCESSOR_CONFIG_FILE, f"missing key '{key}'")
    if not _is_dim(pc["image_size"]):
        raise _err(p / PROCESSOR_CONFIG_FILE, f"image_size: expected a positive int, got {pc['image_size']!r}")
    if "max_text_length" in pc and not _is_dim(pc["max_text_length"]):
        raise _err(p / PROCESSOR_CONFIG_FILE, f"max_text_length: expected a positive int, got {pc['max_text_length']!r}")
    if not isinstance(pc["embodiments"], dict) or not pc["embodiments"]:
        raise _err(p / PROCESSOR_CONFIG_FILE, "embodiments: expected a non-empty map of tag -> embodiment config")
    stats = read_json(p / STATISTICS_FILE)
    if not isinstance(stats, dict):
        raise _err(p / STATISTICS_FILE, "expected a JSON object")
    ids = read_json(p / EMBODIMENT_ID_FILE)
    if not isinstance(ids, dict):
        raise _err(p / EMBODIMENT_ID_FILE, "expected a JSON object")
    return CheckpointInfo(path=p, config=config, processor_config=pc, statistics=stats, embodiment_ids=ids)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (a `PreTrainedTokenizerFast`), loaded offline; errors name tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    tok_file = p / TOKENIZER_FILE
    if not tok_file.is_file():
        raise _err(tok_file, "file is missing (the checkpoint has no tokenizer)")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file whatever the tokenizer library raised
        raise _err(tok_file, f"cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
    if tok.pad_token_id is None:
        raise _err(p / TOKENIZER_CONFIG_FILE, "the tokenizer has no pad token")
    tok.padding_side = "right"
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


def embodiment_entry(
    modality_configs: dict[str, ModalityConfig],
    state_dims: dict[str, int],
    action_dims: dict[str, int],
    **extra: Any,
) -> dict[str, Any]:
    """One value of processor_config.json's ``embodiments`` map."""
    out = {
        "modality_configs": {m: modality_configs[m].to_json() for m in MODALITIES},
        "state_dims": {k: int(v) for k, v in state_dims.items()},
        "action_dims": {k: int(v) for k, v in action_dims.items()},
    }
    out.update(extra)
    return out


def write_processor_config(
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    max_text_length: int,
    embodiments: dict[str, dict[str, Any]],
    use_percentiles: bool = False,
    clip_outliers: bool = True,
    **extra: Any,
) -> Path:
    data = {
        "processor_class": PROCESSOR_CLASS,
        "format_version": FORMAT_VERSION,
        "image_size": int(image_size),
        "max_text_length": int(max_text_length),
        "use_percentiles": bool(use_percentiles),
        "clip_outliers": bool(clip_outliers),
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "embodiments": embodiments,
    }
    data.update(extra)
    return write_json(Path(out_dir) / PROCESSOR_CONFIG_FILE, data)


def write_statistics(out_dir: str | os.PathLike, statistics: dict[str, Any]) -> Path:
    return write_json(Path(out_dir) / STATISTICS_FILE, statistics)


def write_embodiment_ids(out_dir: str | os.PathLike, ids: dict[str, int]) -> Path:
    return write_json(Path(out_dir) / EMBODIMENT_ID_FILE, {k: int(v) for k, v in ids.items()})


def save_tokenizer(out_dir: str | os.PathLike, tokenizer) -> None:
    """Save a PreTrainedTokenizerFast: tokenizer.json + tokenizer_config.json + special_tokens_map.json.

    transformers 5 no longer writes special_tokens_map.json and names its own class in tokenizer_config.json;
    we write the map and the portable class name so older transformers (4.x) load the tokenizer too.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    cfg_path = out / TOKENIZER_CONFIG_FILE
    cfg = read_json(cfg_path)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(cfg_path, cfg)
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            special[name] = str(value)
    write_json(out / SPECIAL_TOKENS_MAP_FILE, special)
