"""backend="gr00t": NVIDIA's Isaac-GR00T `Gr00tPolicy` behind our BasePolicy interface.

Where the Isaac-GR00T package is installed, real GR00T N1.6 checkpoints serve through the same interface as our
native model: `get_actions` concatenates the requests along B into ONE observation and makes one upstream
`get_action` call, then splits the actions back per request.

Noise: upstream's action head draws its flow-matching noise with ONE `torch.randn((B, action_horizon,
max_action_dim))` from torch's global RNG and has no seed option. We hand it the noise instead: the head's module
sees a `torch` whose `randn` returns the noise this thread has pending for exactly that shape (each request's
`options["noise"]`, or drawn from a `torch.Generator` seeded with `options["seed"]`, or from os.urandom), and
torch's own `randn` for anything else. So seeded and unseeded requests share one call, a seed gives the same
actions alone or batched, and the global RNG is never seeded or read, whatever other threads do. Requests whose
images differ in size cannot be concatenated into one array and go in one call per size.

Tags: upstream's policy wants a member of its EmbodimentTag enum (it reads `.value`). A tag the enum lacks but
the checkpoint holds (a fine-tuned robot) is passed as a stand-in with the same `.value` / `.name`; a tag the
checkpoint does not hold is refused, listing the ones it does.

The package is imported lazily, only when this backend is asked for.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from clients.modality import ModalityConfig

from .base import DEFAULT_MAX_BATCH_PER_REQUEST, BasePolicy, PolicyInputError
from .checkpoint import PROCESSOR_CONFIG_FILE, CheckpointError, check_directory, read_json
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


@dataclasses.dataclass(frozen=True)
class CustomTag:
    """Stands in for an upstream EmbodimentTag member for a tag the enum lacks (what upstream reads of it)."""

    value: str

    @property
    def name(self) -> str:
        return self.value.upper()


def upstream_tag(tag_cls: Any, tag: str, checkpoint_tags: list[str] | None) -> Any:
    """Upstream's enum member for ``tag``; a CustomTag where the enum lacks it but the checkpoint holds it.
    ``checkpoint_tags``: the tags the checkpoint's processor config holds (None: not known here, a hub id)."""
    if checkpoint_tags is not None and tag not in checkpoint_tags:
        raise ValueError(
            f"embodiment tag {tag!r} is not in checkpoint's processor_config.json (it holds: "
            f"{', '.join(sorted(checkpoint_tags)) or '(none)'})"
        )
    for member in tag_cls:
        if str(getattr(member, "value", "")).lower() == tag or str(getattr(member, "name", "")).lower() == tag:
            return member
    return CustomTag(tag)


class _NoiseInjectingTorch:
    """What the upstream action head's module sees as ``torch``: torch itself, except that ``randn`` of the
    shape this thread has noise pending for returns that noise (once)."""

    def __init__(self, torch_module: Any):
        self._torch = torch_module
        self._pending = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def pend(self, noise: Any) -> None:
        self._pending.noise = noise

    def take(self) -> Any:
        noise, self._pending.noise = getattr(self._pending, "noise", None), None
        return noise

    def randn(self, *args: Any, **kwargs: Any) -> Any:
        noise = getattr(self._pending, "noise", None)
        if noise is not None:
            size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
            if tuple(int(d) for d in size) == tuple(noise.shape):
                self._pending.noise = None
                dtype = kwargs.get("dtype") or self._torch.get_default_dtype()
                return noise.to(device=kwargs.get("device") or "cpu", dtype=dtype)
        return self._torch.randn(*args, **kwargs)


_INJECTORS: dict[str, _NoiseInjectingTorch] = {}
_INJECTORS_LOCK = threading.Lock()


def noise_injector(module_name: str) -> _NoiseInjectingTorch:
    """The injector installed as ``torch`` in upstream module ``module_name`` (installed once per module)."""
    import torch

    with _INJECTORS_LOCK:
        if module_name not in _INJECTORS:
            module = sys.modules.get(module_name)
            if module is None or getattr(module, "torch", None) is not torch:
                raise RuntimeError(
                    f"cannot hand noise to upstream's action head: module {module_name!r} does not use torch as "
                    "`torch` (an Isaac-GR00T version this backend does not know)"
                )
            _INJECTORS[module_name] = _NoiseInjectingTorch(torch)
            module.torch = _INJECTORS[module_name]
        return _INJECTORS[module_name]


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
        kwargs = self._processor_kwargs()
        held = list(kwargs.get("modality_configs", {})) if kwargs is not None else None
        self._inner = gr00t_policy_cls(
            model_path=self.model_path,
            embodiment_tag=upstream_tag(tag_cls, self.embodiment_tag, held),
            device=device,
            strict=strict,
        )
        raw = self._inner.get_modality_config()
        self._modality = {m: to_modality_config(raw[m], f"gr00t modality_config.{m}") for m in _MODALITIES}
        self._state_dims = self._find_dims("state")
        self._action_dims = self._find_dims("action")
        self._image_size = self._model_image_size(kwargs)
        cfg = getattr(getattr(self._inner, "model", None), "config", None)
        self.noise_shape = (int(cfg.action_horizon), int(cfg.max_action_dim))
        self._injector = noise_injector(type(self._inner.model.action_head).__module__)
        self._lock = threading.Lock()  # one upstream call at a time: its model and processor are not thread-safe

    def _processor_kwargs(self) -> dict[str, Any] | None:
        path = Path(self.model_path) / PROCESSOR_CONFIG_FILE
        if not path.is_file():
            return None  # a hub id: upstream reads it
        kwargs = read_json(path).get("processor_kwargs")
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"checkpoint {path}: missing key 'processor_kwargs'")
        return kwargs

    @staticmethod
    def _model_image_size(kwargs: dict[str, Any] | None) -> list[int]:
        """What the vision tower sees, from the checkpoint's image settings (N1.6: 252 x 252)."""
        from .image_transforms import Gr00tImageTransform
        from .processing_gr00t_n1d6 import eagle_image_size

        if kwargs is None:
            return [252, 252]
        img = Gr00tImageTransform.from_processor_kwargs(kwargs, letter_box_default=True)(np.zeros((256, 256, 3), np.uint8))
        return list(eagle_image_size(img.shape[0], img.shape[1]))

    def _find_dims(self, kind: str) -> dict[str, int] | None:
        """State / action dims from upstream's statistics when its processor exposes them."""
        keys = self._modality[kind].modality_keys
        try:
            sap = self._inner.processor.state_action_processor
            params = sap.norm_params[self.embodiment_tag][kind]
            return {k: int(np.asarray(params[k]["dim"]).item()) for k in keys}
        except Exception:  # noqa: BLE001 - an upstream version without these tables: shapes checked by upstream
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
        return {
            "embodiment_tag": self.embodiment_tag,
            "modality_config": {m: mc[m].to_json() for m in _MODALITIES},
            "state_dims": dict(self._state_dims or {}),
            "action_dims": dict(self._action_dims or {}),
            "action_horizon": len(mc["action"].delta_indices),
            "video_keys": list(mc["video"].modality_keys),
            "language_keys": list(mc["language"].modality_keys),
            "image_size": list(self._image_size),
            "noise_shape": list(self.noise_shape),
            "strict": bool(self.strict),
            "max_batch_per_request": int(self.max_batch_per_request),
            "model": model,
        }

    # ---- inference -------------------------------------------------------------------------------------------------
    def prepare_request_options(self, options: dict[str, Any], batch_size: int, observation: Any,
                                clean: dict[str, Any]) -> dict[str, Any]:
        if options.get("rtc") is not None or options.get("rtc_frozen_steps") is not None:
            raise PolicyInputError("options.rtc: real-time chunking runs on the native backend, not backend='gr00t'")
        noise = options.get("noise")
        want = (batch_size, *self.noise_shape)
        if noise is not None and (not isinstance(noise, np.ndarray) or noise.dtype != np.float32 or noise.shape != want):
            got = f"{noise.dtype} {noise.shape}" if isinstance(noise, np.ndarray) else type(noise).__name__
            raise PolicyInputError(
                f"options.noise: expected float32 array of shape {want} (B, action_horizon, max_action_dim), got {got}"
            )
        return options

    def _noise(self, batch_size: int, options: dict[str, Any]):
        import torch

        if options.get("noise") is not None:
            return torch.from_numpy(np.array(options["noise"], dtype=np.float32))
        seed = options.get("seed")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little"))
        return torch.randn((batch_size, *self.noise_shape), generator=gen, dtype=torch.float32)

    def _signature(self, obs: dict[str, Any]) -> tuple:
        return tuple(obs["video"][k].shape[1:] for k in self._modality["video"].modality_keys)

    def _call(self, group: list[int], observations: list[dict[str, Any]], noise) -> dict[str, np.ndarray]:
        mc = self._modality
        batch = {
            "video": {k: np.concatenate([observations[i]["video"][k] for i in group]) for k in mc["video"].modality_keys},
            "state": {k: np.concatenate([observations[i]["state"][k] for i in group]) for k in mc["state"].modality_keys},
            "language": {
                k: [[t] for i in group for t in observations[i]["language"][k]] for k in mc["language"].modality_keys
            },
        }
        with self._lock:
            self._injector.pend(noise)
            try:
                action, _info = self._inner.get_action(batch)
            finally:
                unused = self._injector.take()
        if unused is not None:
            raise RuntimeError(
                f"upstream's action head drew no noise of shape {tuple(noise.shape)} through torch.randn; this "
                "Isaac-GR00T version draws it another way, and the backend cannot hand it its noise"
            )
        return action

    def _infer(
        self, observations: list[dict[str, Any]], options: list[dict[str, Any]], sizes: list[int]
    ) -> list[dict[str, np.ndarray]]:
        import torch

        groups: dict[tuple, list[int]] = {}
        for i, obs in enumerate(observations):
            groups.setdefault(self._signature(obs), []).append(i)
        out: list[dict[str, np.ndarray] | None] = [None] * len(observations)
        for group in groups.values():
            noise = torch.cat([self._noise(sizes[i], options[i]) for i in group], dim=0)
            action = self._call(group, observations, noise)
            start = 0
            for i in group:
                b = sizes[i]
                out[i] = {k: np.ascontiguousarray(np.asarray(v)[start : start + b], dtype=np.float32) for k, v in action.items()}
                start += b
        return out  # type: ignore[return-value]


__all__ = ["CustomTag", "Gr00tBackendPolicy", "import_gr00t", "to_modality_config", "upstream_tag"]
