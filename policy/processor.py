"""Pre- and post-processing for one embodiment of a checkpoint: observations -> model tensors -> actions.

Everything works on the whole batch at once (N = the samples of all requests together):

- images: grouped by input resolution, each group resized to S x S in ONE `F.interpolate` call (bilinear,
  antialias) and normalised to [-1, 1] as SigLIP expects ((x / 255 - 0.5) / 0.5). A sample's V images are its
  cameras in modality-key order, each with its T video frames (camera-major).
- language: the first language key (as upstream GR00T: further keys are training-time paraphrases), tokenised
  in one batched call (right padding, truncation to `max_text_length`).
- states: normalised per key (min/max -> [-1, 1] clipped; q01/q99 instead when `use_percentiles`; mean/std for
  `mean_std_embedding_keys`; [sin x, cos x] of the raw value for `sin_cos_embedding_keys`), concatenated in
  modality-key order and zero-padded to `max_state_dim`.
- actions: sliced per key in modality-key order, un-normalised (statistics of `relative_action` for
  RELATIVE / DELTA keys when the checkpoint has them, else of `action`), then RELATIVE / DELTA keys get the
  current (last of T) physical state of their `state_key` added.

The formulas follow upstream GR00T N1.6 (`gr00t.data.utils`): a dimension with max == min normalises to 0 and
un-normalises to min; a zero std passes the value through; un-normalisation clips to [-1, 1] first.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clients.modality import ActionFormat, ActionRepresentation, ActionType

from .checkpoint import CheckpointError, CheckpointInfo, EmbodimentSpec, load_tokenizer, read_checkpoint

MIN_MAX = "min_max"
PERCENTILES = "percentiles"
MEAN_STD = "mean_std"
SIN_COS = "sin_cos"
METHODS = (MIN_MAX, PERCENTILES, MEAN_STD)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation math (numpy, any leading shape, last axis = D)
# ----------------------------------------------------------------------------------------------------------------


def _bounds(stats: Mapping[str, Any], method: str) -> tuple[np.ndarray, np.ndarray]:
    if method == MIN_MAX:
        return np.asarray(stats["min"], dtype=np.float64), np.asarray(stats["max"], dtype=np.float64)
    if method == PERCENTILES:
        return np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
    raise ValueError(f"normalisation method: expected one of {METHODS}, got {method!r}")


def normalize(values: np.ndarray, stats: Mapping[str, Any], method: str = MIN_MAX, *, clip: bool = True) -> np.ndarray:
    """Physical values -> normalised (float32).

    min_max / percentiles: linear map of [min, max] (or [q01, q99]) onto [-1, 1], clipped when `clip`;
    dimensions with max == min map to 0. mean_std: (x - mean) / std; dimensions with std == 0 pass through.
    """
    x = np.asarray(values, dtype=np.float64)
    if method == MEAN_STD:
        mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
        ok = std != 0
        out = np.where(ok, (x - mean) / np.where(ok, std, 1.0), x)
        return out.astype(np.float32)
    lo, hi = _bounds(stats, method)
    ok = ~np.isclose(hi, lo)
    span = np.where(ok, hi - lo, 1.0)
    out = np.where(ok, 2.0 * (x - lo) / span - 1.0, 0.0)
    if clip:
        out = np.clip(out, -1.0, 1.0)
    return out.astype(np.float32)


def unnormalize(values: np.ndarray, stats: Mapping[str, Any], method: str = MIN_MAX) -> np.ndarray:
    """Inverse of `normalize` (float32). min_max / percentiles clip the input to [-1, 1] first."""
    x = np.asarray(values, dtype=np.float64)
    if method == MEAN_STD:
        mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
        ok = std != 0
        return np.where(ok, x * std + mean, x).astype(np.float32)
    lo, hi = _bounds(stats, method)
    out = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo
    return out.astype(np.float32)


def sin_cos_encode(values: np.ndarray) -> np.ndarray:
    """[sin x, cos x] along the last axis (D -> 2D), of the raw (physical) value."""
    x = np.asarray(values, dtype=np.float64)
    return np.concatenate([np.sin(x), np.cos(x)], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Helpers on (validated) observations
# ----------------------------------------------------------------------------------------------------------------


def _texts(value: Any) -> list[str]:
    """A language value ([[str]] * B, [str] * B or a tuple) -> list of B strings."""
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        else:
            out.append(str(item[0]))
    return out


def _batch_size(obs: Mapping[str, Any], spec: EmbodimentSpec) -> int:
    for key in spec.state_keys:
        return int(np.shape(obs["state"][key])[0])
    for key in spec.video_keys:
        return int(np.shape(obs["video"][key])[0])
    return len(obs["language"][spec.language_keys[0]])


class Processor:
    """Turns a list of observations (each with its own batch size B_i) into one batch of model tensors, and the
    model's normalised actions back into physical actions per key."""

    def __init__(
        self,
        spec: EmbodimentSpec,
        tokenizer: Any,
        *,
        image_size: int,
        max_state_dim: int,
        max_action_dim: int,
        model_action_horizon: int,
        max_text_length: int = 64,
        use_percentiles: bool = False,
        clip_outliers: bool = True,
        where: str = "processor",
    ):
        self.spec = spec
        self.tokenizer = tokenizer
        # A fast tokenizer sets its padding / truncation state per call: concurrent calls from several threads
        # fail ("Already borrowed"). Serialise just the tokenisation.
        self._tokenizer_lock = threading.Lock()
        self.image_size = int(image_size)
        self.max_state_dim = int(max_state_dim)
        self.max_action_dim = int(max_action_dim)
        self.model_action_horizon = int(model_action_horizon)
        self.max_text_length = int(max_text_length)
        self.use_percentiles = bool(use_percentiles)
        self.clip_outliers = bool(clip_outliers)
        self.range_method = PERCENTILES if self.use_percentiles else MIN_MAX

        mc = spec.modality_configs
        self.video_keys = spec.video_keys
        self.state_keys = spec.state_keys
        self.action_keys = spec.action_keys
        self.language_key = spec.language_keys[0]
        self.video_horizon = len(mc["video"].delta_indices)
        self.state_horizon = len(mc["state"].delta_indices)
        self.action_horizon = len(mc["action"].delta_indices)
        self.num_views = len(self.video_keys) * self.video_horizon

        enc = spec.encoded_state_dim()
        if enc > self.max_state_dim:
            raise CheckpointError(
                f"{where}: embodiment {spec.tag!r} has {enc} state features, more than the model's max_state_dim "
                f"{self.max_state_dim}"
            )
        if spec.total_action_dim() > self.max_action_dim:
            raise CheckpointError(
                f"{where}: embodiment {spec.tag!r} has {spec.total_action_dim()} action dims, more than the model's "
                f"max_action_dim {self.max_action_dim}"
            )
        if self.action_horizon > self.model_action_horizon:
            raise CheckpointError(
                f"{where}: embodiment {spec.tag!r} asks for {self.action_horizon} action steps, the model makes "
                f"{self.model_action_horizon}"
            )

        # Per-key state method
        sincos = set(mc["state"].sin_cos_embedding_keys or ())
        meanstd = set(mc["state"].mean_std_embedding_keys or ())
        self.state_methods = {
            k: SIN_COS if k in sincos else MEAN_STD if k in meanstd else self.range_method for k in self.state_keys
        }
        # Per-key action method, statistics and representation
        a_meanstd = set(mc["action"].mean_std_embedding_keys or ())
        acfgs = mc["action"].action_configs or [None] * len(self.action_keys)
        rel_stats = spec.statistics.get("relative_action", {})
        self.action_plan: list[tuple[str, int, int, str, dict, str | None]] = []  # key, offset, D, method, stats, state_key
        offset = 0
        for key, ac in zip(self.action_keys, acfgs):
            d = spec.action_dims[key]
            state_key = None
            stats = spec.statistics["action"][key]
            if ac is not None and ac.rep in (ActionRepresentation.RELATIVE, ActionRepresentation.DELTA):
                if ac.type == ActionType.EEF and ac.format in (ActionFormat.XYZ_ROT6D, ActionFormat.XYZ_ROTVEC):
                    raise CheckpointError(
                        f"{where}: action {key!r} is {ac.rep.name} EEF {ac.format.name}; pose composition of "
                        f"relative end-effector actions is not supported by the native backend"
                    )
                state_key = ac.state_key or key
                stats = rel_stats.get(key, stats)
            method = MEAN_STD if key in a_meanstd else self.range_method
            self.action_plan.append((key, offset, d, method, stats, state_key))
            offset += d
        self.total_action_dim = offset

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: CheckpointInfo | str,
        tag: str,
        *,
        tokenizer: Any = None,
        max_state_dim: int | None = None,
        max_action_dim: int | None = None,
        model_action_horizon: int | None = None,
    ) -> "Processor":
        """Build from a checkpoint directory (model limits read from config.json unless given)."""
        info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
        spec = info.embodiment(tag)
        cfg_path = info.path / "config.json"

        def from_config(name: str, given: int | None) -> int:
            if given is not None:
                return int(given)
            if name not in info.config:
                raise CheckpointError(f"checkpoint {cfg_path}: missing key '{name}'")
            return int(info.config[name])

        return cls(
            spec,
            tokenizer if tokenizer is not None else load_tokenizer(info.path),
            image_size=info.image_size,
            max_state_dim=from_config("max_state_dim", max_state_dim),
            max_action_dim=from_config("max_action_dim", max_action_dim),
            model_action_horizon=from_config("action_horizon", model_action_horizon),
            max_text_length=info.max_text_length,
            use_percentiles=info.use_percentiles,
            clip_outliers=info.clip_outliers,
            where=f"checkpoint {info.path / 'processor_config.json'}",
        )

    # ------------------------------------------------------------------------------------------------------------
    # States
    # ------------------------------------------------------------------------------------------------------------
    def collect_states(self, observations: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Raw physical states of all samples: {key: float32 (N, T, D)}."""
        return {
            k: np.concatenate([np.asarray(o["state"][k], dtype=np.float32) for o in observations], axis=0)
            if len(observations) > 1
            else np.asarray(observations[0]["state"][k], dtype=np.float32)
            for k in self.state_keys
        }

    def normalize_states(self, states: Mapping[str, np.ndarray]) -> np.ndarray:
        """{key: (N, T, D)} physical -> (N, T, max_state_dim) float32, normalised and zero-padded."""
        parts = []
        for key in self.state_keys:
            x = states[key]
            method = self.state_methods[key]
            if method == SIN_COS:
                parts.append(sin_cos_encode(x))
            else:
                stats = self.spec.statistics["state"][key]
                parts.append(normalize(x, stats, method, clip=self.clip_outliers and method != MEAN_STD))
        enc = np.concatenate(parts, axis=-1)
        n, t, e = enc.shape
        out = np.zeros((n, t, self.max_state_dim), dtype=np.float32)
        out[:, :, :e] = enc
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Images
    # ------------------------------------------------------------------------------------------------------------
    def images_to_tensor(
        self,
        observations: Sequence[Mapping[str, Any]],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(N, V, 3, S, S) in [-1, 1]. One resize per distinct input resolution."""
        device = torch.device(device)
        sizes = list(sizes) if sizes is not None else [_batch_size(o, self.spec) for o in observations]
        n = sum(sizes)
        s = self.image_size
        tv = self.video_horizon
        out = torch.empty((n, self.num_views, 3, s, s), dtype=dtype, device=device)
        if self.num_views == 0:
            return out
        # group (sample offset, B, camera index, array) by (H, W)
        groups: dict[tuple[int, int], list[tuple[int, int, int, np.ndarray]]] = {}
        offset = 0
        for obs, b in zip(observations, sizes):
            for ci, cam in enumerate(self.video_keys):
                arr = obs["video"][cam]
                groups.setdefault((int(arr.shape[2]), int(arr.shape[3])), []).append((offset, b, ci, arr))
            offset += b
        pin = device.type == "cuda"
        for (h, w), items in groups.items():
            # Wire arrays are often read-only views of the message bytes: copy them with numpy (into pinned
            # memory on CUDA) rather than hand torch a read-only buffer.
            parts = [np.asarray(a).reshape(-1, h, w, 3) for (_, _, _, a) in items]
            if pin:
                total = sum(p.shape[0] for p in parts)
                staging = torch.empty((total, h, w, 3), dtype=torch.uint8, pin_memory=True)
                np.concatenate(parts, axis=0, out=staging.numpy())
                imgs = staging.to(device, non_blocking=True)
            elif len(parts) == 1 and parts[0].flags.writeable:
                imgs = torch.from_numpy(parts[0])
            else:
                imgs = torch.from_numpy(np.concatenate(parts, axis=0))
            x = imgs.permute(0, 3, 1, 2).to(torch.float32)  # (M, 3, H, W) in [0, 255]
            if (h, w) != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            x = (x * (1.0 / 127.5) - 1.0).to(dtype)  # == (x / 255 - 0.5) / 0.5
            row = 0
            for off, b, ci, _ in items:
                m = b * tv
                out[off : off + b, ci * tv : (ci + 1) * tv] = x[row : row + m].view(b, tv, 3, s, s)
                row += m
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Whole batch
    # ------------------------------------------------------------------------------------------------------------
    def tokenize(
        self, texts: list[str], device: torch.device | str = "cpu", *, fixed_length: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask (N, L): L = the longest text, or ``max_text_length`` with ``fixed_length``
        (one shape for every batch, as compiled / CUDA-graph execution wants)."""
        with self._tokenizer_lock:
            enc = self.tokenizer(
                texts,
                padding="max_length" if fixed_length else "longest",
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def preprocess(
        self,
        observations: Sequence[Mapping[str, Any]],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        states: Mapping[str, np.ndarray] | None = None,
        fixed_text_length: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for all samples of `observations` (validated observations, nested form).

        Returns pixel_values (N, V, 3, S, S) `dtype`, input_ids / attention_mask (N, L) long, state
        (N, T_s, max_state_dim) `dtype` on `device`; embodiment_id: the embodiment's int id (a batch is one
        embodiment, so the model runs its per-embodiment layers as plain linears, with no per-sample gather).
        """
        if not observations:
            raise ValueError("preprocess: no observations")
        device = torch.device(device)
        sizes = [_batch_size(o, self.spec) for o in observations]
        pixel_values = self.images_to_tensor(observations, device=device, dtype=dtype, sizes=sizes)
        texts: list[str] = []
        for o in observations:
            texts.extend(_texts(o["language"][self.language_key]))
        input_ids, attention_mask = self.tokenize(texts, device, fixed_length=fixed_text_length)
        if states is None:
            states = self.collect_states(observations)
        state = torch.from_numpy(self.normalize_states(states))
        if device.type == "cuda":
            state = state.pin_memory().to(device, dtype=dtype, non_blocking=True)
        else:
            state = state.to(dtype)
        embodiment_id = int(self.spec.embodiment_id)
        return {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "state": state,
            "embodiment_id": embodiment_id,
        }

    # ------------------------------------------------------------------------------------------------------------
    # Actions
    # ------------------------------------------------------------------------------------------------------------
    def decode_actions(
        self,
        normalized: torch.Tensor | np.ndarray,
        states: Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        """(N, H_model, max_action_dim) normalised -> {key: float32 (N, horizon, D)} in physical units.

        `states`: the raw states {key: (N, T, D)} (or the observations they come from) for RELATIVE / DELTA keys.
        """
        if isinstance(normalized, torch.Tensor):
            a = normalized.detach().to("cpu", torch.float32).numpy()
        else:
            a = np.asarray(normalized, dtype=np.float32)
        if a.ndim != 3 or a.shape[1] < self.action_horizon or a.shape[2] < self.total_action_dim:
            raise ValueError(
                f"decode_actions: expected normalised actions of shape (N, >={self.action_horizon}, "
                f">={self.total_action_dim}), got {a.shape}"
            )
        if not isinstance(states, Mapping):
            states = self.collect_states(states)
        a = a[:, : self.action_horizon]
        out: dict[str, np.ndarray] = {}
        for key, off, d, method, stats, state_key in self.action_plan:
            x = unnormalize(a[:, :, off : off + d], stats, method)
            if state_key is not None:
                ref = np.asarray(states[state_key], dtype=np.float32)[:, -1:, :]
                x = x + ref
            out[key] = np.ascontiguousarray(x, dtype=np.float32)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "image_size": [self.image_size, self.image_size],
            "max_text_length": self.max_text_length,
            "use_percentiles": self.use_percentiles,
            "state_methods": dict(self.state_methods),
            "num_views": self.num_views,
        }

