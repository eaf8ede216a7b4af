"""backend="gr00t": NVIDIA's Isaac-GR00T `Gr00tPolicy` behind our BasePolicy interface.

Where the Isaac-GR00T package is installed, real GR00T N1.6 checkpoints serve through the same interface as our
native model: `get_actions` concatenates the requests along B into ONE observation and makes one upstream
`get_action` call, then splits the actions back per request.

Seeds: upstream draws its flow-matching noise from torch's global RNG and has no seed option. A request with
`options["seed"]` therefore runs in its own upstream call under `torch.random.fork_rng()` + `torch.manual_seed`
(reproducible alone or batched, global RNG state untouched); unseeded requests share one call. Requests whose
images differ in size cannot be concatenated into one array and go in one call per size.

The package is imported lazily, only when this backend is asked for.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from clients.modality import ModalityConfig

from .base import DEFAULT_MAX_BATCH_PER_REQUEST, BasePolicy
from .checkpoint import check_directory, read_json
from .embodiment import resolve_tag

_MODALITIES = ("video", "state", "action", "language")


def import_gr00t() -> tuple[Any, Any]:
    """(Gr00tPolicy, EmbodimentTag) from NVIDIA's package, or ImportError with a clear message."""
    try:
        policy_mod = importlib.import_module("gr00t.policy.gr00t_policy")
        tags_mod = importlib.import_module("gr00t.data.embodiment_tags")
        return policy_mod.Gr00tPolicy, tags_mod.EmbodimentTag
    except Exception as exc:  # noqa: BLE001 - ImportError, or the package failing at import time
        raise ImportError(
            f"backend='gr00t' needs NVIDIA's Isaac-GR00T package (import gr00t failed: {type(exc).__name__}: {exc}); "
            f"install it (https://github.com/NVIDIA/Isaac-GR00T) or use backend='native'"
        ) from exc


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def to_modality_config(value: Any, where: str) -> ModalityConfig:
    """Upstream ModalityConfig (any generation) -> ours, through its JSON form."""
    if isinstance(value, ModalityConfig):
        return value
    if hasattr(value, "to_json") and callable(value.to_json):
        data = value.to_json()
    elif isinstance(value, dict):
        data = value
    else:
        data = {
            name: _to_jsonable(getattr(value, name, None))
            for name in ("delta_indices", "modality_keys", "sin_cos_embedding_keys", "mean_std_embedding_keys",
                         "action_configs")
        }
    data = _to_jsonable(data)
    if isinstance(data, dict) and data.get("action_configs") is not None:
        data = dict(data)
        data["action_configs"] = [
            _to_jsonable(ac if isinstance(ac, dict) else {n: getattr(ac, n, None) for n in ("rep", "type", "format", "state_key")})
            for ac in data["action_configs"]
        ]
    return ModalityConfig.from_json(data, where)


def _upstream_tag(tag_cls: Any, tag: str) -> Any:
    try:
        return tag_cls(tag)
    except Exception:  # noqa: BLE001
        pass
    resolve = getattr(tag_cls, "resolve", None)
    if callable(resolve):
        try:
            return resolve(tag)
        except Exception:  # noqa: BLE001
            pass
    try:
        return tag_cls[tag.upper()]
    except Exception:  # noqa: BLE001
        return tag  # newer upstream resolves strings itself; older ones fail with their own list of tags


class Gr00tBackendPolicy(BasePolicy):
    backend = "gr00t"

    def __init__(
        self,
        model_path: str | os.PathLike,
        embodiment_tag: Any,
        *,
        device: str | int = "cuda",
        strict: bool = True,
        max_batch_per_request: int = DEFAULT_MAX_BATCH_PER_REQUEST,
    ):
        gr00t_policy_cls, tag_cls = import_gr00t()
        self.strict = bool(strict)
        self.max_batch_per_request = int(max_batch_per_request)
        self.device = str(device)
        local = Path(model_path).expanduser()
        # A local directory is checked here (errors name the file); anything else (a Hugging Face id) is
        # left to upstream.
        text = str(model_path)
        hub_id = not local.exists() and re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", text) is not None
        self.model_path = text if hub_id else str(check_directory(local))
        self.embodiment_tag = resolve_tag(embodiment_tag)
        self._inner = gr00t_policy_cls(
            model_path=self.model_path,
            embodiment_tag=_upstream_tag(tag_cls, self.embodiment_tag),
            device=device,
            strict=strict,
        )
        raw = self._inner.get_modality_config()
        self._modality = {m: to_modality_config(raw[m], f"gr00t modality_config.{m}") for m in _MODALITIES}
        self._state_dims = self._find_dims("state")
        self._action_dims = self._find_dims("action")

    def _find_dims(self, kind: str) -> dict[str, int] | None:
        """State / action dims from upstream's statistics when its processor exposes them."""
        keys = self._modality[kind].modality_keys
        try:
            sap = self._inner.processor.state_action_processor
            params = sap.norm_params[self.embodiment_tag][kind]
            return {k: int(np.asarray(params[k]["dim"]).item()) for k in keys}
        except Exception:  # noqa: BLE001
            pass
        try:
            stats = self._inner.processor.statistics[self.embodiment_tag][kind]
            return {k: len(stats[k]["max"]) for k in keys}
        except Exception:  # noqa: BLE001
            return None

    # ---- BasePolicy ----------------------------------------------------------------------------------------------
    def get_modality_config(self) -> dict[str, ModalityConfig]:
        return dict(self._modality)

    @property
    def state_dims(self) -> dict[str, int] | None:
        return None if self._state_dims is None else dict(self._state_dims)

    @property
    def action_dims(self) -> dict[str, int] | None:
        return None if self._action_dims is None else dict(self._action_dims)

    def reset(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        super().reset(options)
        info = self._inner.reset(options) if hasattr(self._inner, "reset") else {}
        return dict(info) if isinstance(info, dict) else {}

    def describe(self) -> dict[str, Any]:
        mc = self._modality
        model: dict[str, Any] = {"backend": self.backend, "path": self.model_path, "device": self.device}
        inner_model = getattr(self._inner, "model", None)
        cfg = getattr(inner_model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type is None:
            try:
                model_type = read_json(Path(self.model_path) / "config.json").get("model_type")
            except Exception:  # noqa: BLE001
                model_type = None
        model["model_type"] = str(model_type) if model_type is not None else "unknown"
        try:
            model["parameters"] = int(sum(p.numel() for p in inner_model.parameters()))
        except Exception:  # noqa: BLE001
            model["parameters"] = 0
        try:
            model["dtype"] = str(next(inner_model.parameters()).dtype).removeprefix("torch.")
        except Exception:  # noqa: BLE001
            model["dtype"] = "bfloat16"
        image_size = None
        proc = getattr(self._inner, "processor", None)
        for attr in ("image_target_size", "image_size"):
            v = getattr(proc, attr, None)
            if isinstance(v, int):
                image_size = [v, v]
                break
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
                image_size = [int(v[0]), int(v[1])]
                break
        if image_size is None:
            image_size = [224, 224]  # upstream does not expose it here; N1.6 resizes any H x W itself
        return {
            "embodiment_tag": self.embodiment_tag,
            "modality_config": {m: mc[m].to_json() for m in _MODALITIES},
            "state_dims": dict(self._state_dims or {}),
            "action_dims": dict(self._action_dims or {}),
            "action_horizon": len(mc["action"].delta_indices),
            "video_keys": list(mc["video"].modality_keys),
            "language_keys": list(mc["language"].modality_keys),
            "image_size": image_size,
            "strict": bool(self.strict),
            "max_batch_per_request": int(self.max_batch_per_request),
            "model": model,
        }

    # ---- inference -------------------------------------------------------------------------------------------------
    def _signature(self, obs: dict[str, Any]) -> tuple:
        return tuple(obs["video"][k].shape[1:] for k in self._modality["video"].modality_keys)

    def _call(self, group: list[int], observations: list[dict[str, Any]], seed: int | None) -> dict[str, np.ndarray]:
        mc = self._modality
        batch = {
            "video": {k: np.concatenate([observations[i]["video"][k] for i in group]) for k in mc["video"].modality_keys},
            "state": {k: np.concatenate([observations[i]["state"][k] for i in group]) for k in mc["state"].modality_keys},
            "language": {
                k: [[t] for i in group for t in observations[i]["language"][k]] for k in mc["language"].modality_keys
            },
        }
        if seed is None:
            action, _info = self._inner.get_action(batch)
            return action
        import torch

        devices = []
        if self.device.startswith("cuda") and torch.cuda.is_available():
            devices = [torch.device(self.device).index or 0]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            action, _info = self._inner.get_action(batch)
        return action

    def _infer(
        self, observations: list[dict[str, Any]], options: list[dict[str, Any]], sizes: list[int]
    ) -> list[dict[str, np.ndarray]]:
        calls: list[tuple[list[int], int | None]] = []
        unseeded: dict[tuple, list[int]] = {}
        for i, opts in enumerate(options):
            if opts.get("seed") is not None:
                calls.append(([i], int(opts["seed"])))
            else:
                unseeded.setdefault(self._signature(observations[i]), []).append(i)
        calls.extend((g, None) for g in unseeded.values())
        out: list[dict[str, np.ndarray] | None] = [None] * len(observations)
        for group, seed in calls:
            action = self._call(group, observations, seed)
            start = 0
            for i in group:
                b = sizes[i]
                out[i] = {k: np.ascontiguousarray(np.asarray(v)[start : start + b], dtype=np.float32) for k, v in action.items()}
                start += b
        return out  # type: ignore[return-value]


__all__ = ["Gr00tBackendPolicy", "import_gr00t", "to_modality_config"]
