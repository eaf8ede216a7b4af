"""States in, actions out: GR00T's state normalisation and action decoding (N1.6 and N1.7), batched.

Numerics follow NVIDIA's numpy code, including where it rounds to float32 (a min/max ratio is stored as float32
before ``2x - 1``; mean/std results land in float32 arrays), so normalised states match bit for bit:

* state key in ``sin_cos_embedding_keys`` (with ``apply_sincos_state_encoding``): [sin x, cos x] of the raw
  value (D -> 2D);
* in ``mean_std_embedding_keys``: (x - mean) / std, features with std 0 pass through, never clipped;
* otherwise: 2 (x - lo) / (hi - lo) - 1 with lo/hi = min/max (q01/q99 with ``use_percentiles``), 0 where hi and
  lo are numerically equal, clipped to [-1, 1] with ``clip_outliers``;
* concatenated in modality-key order, zero-padded to ``max_state_dim``.

Actions: the first ``len(action.delta_indices)`` rows of the model's output, split by key in modality-key
order; mean/std keys: y * std + mean; others: (clip(y) + 1) / 2 * (hi - lo) + lo. A RELATIVE key (with
``use_relative_action``) uses its per-step ``relative_action`` statistics (min/max, never percentiles) and is
then added to the last raw state of its ``state_key`` (joint space), or composed with it (end-effector poses,
``XYZ_ROT6D`` / ``XYZ_ROTVEC``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from clients.modality import ActionFormat, ActionRepresentation, ActionType

from .checkpoint import CheckpointError, EmbodimentSpec

SIN_COS, MEAN_STD, MIN_MAX = "sin_cos", "mean_std", "min_max"


# ----------------------------------------------------------------------------------------------------------------
# End-effector poses (rotation matrices in numpy; no scipy needed)
# ----------------------------------------------------------------------------------------------------------------


def rot6d_to_matrix(r6: np.ndarray) -> np.ndarray:
    """(..., 6) -> (..., 3, 3): the two rows, Gram-Schmidt, third row their cross product."""
    a, b = r6[..., 0:3], r6[..., 3:6]
    r1 = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - np.sum(r1 * b, axis=-1, keepdims=True) * r1
    r2 = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.stack([r1, r2, np.cross(r1, r2)], axis=-2)


def rotvec_to_matrix(rv: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 3, 3) (Rodrigues; the small-angle series near 0)."""
    theta = np.linalg.norm(rv, axis=-1)[..., None, None]
    k = np.zeros(rv.shape[:-1] + (3, 3))
    x, y, z = rv[..., 0], rv[..., 1], rv[..., 2]
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 0] = -z, y, z
    k[..., 1, 2], k[..., 2, 0], k[..., 2, 1] = -x, -y, x
    small = theta < 1e-6
    safe = np.where(small, 1.0, theta)
    s = np.where(small, 1.0 - theta**2 / 6.0, np.sin(safe) / safe)
    c = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
    return np.eye(3) + s * k + c * (k @ k)


def matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 3), via the quaternion with w >= 0 (the angle in [0, pi])."""
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    q = np.empty(m.shape[:-2] + (4,))  # x, y, z, w
    cands = np.stack([m[..., 0, 0], m[..., 1, 1], m[..., 2, 2], tr], axis=-1)
    best = np.argmax(cands, axis=-1)
    for i in range(3):  # Shepperd: divide by the largest component
        sel = best == i
        j, k = (i + 1) % 3, (i + 2) % 3
        qi = np.sqrt(np.maximum(1.0 + 2.0 * m[sel][..., i, i] - tr[sel], 0.0)) / 2.0
        q[sel, i] = qi
        q[sel, j] = (m[sel][..., j, i] + m[sel][..., i, j]) / (4 * qi)
        q[sel, k] = (m[sel][..., k, i] + m[sel][..., i, k]) / (4 * qi)
        q[sel, 3] = (m[sel][..., k, j] - m[sel][..., j, k]) / (4 * qi)
    sel = best == 3
    w = np.sqrt(np.maximum(1.0 + tr[sel], 0.0)) / 2.0
    q[sel, 3] = w
    q[sel, 0] = (m[sel][..., 2, 1] - m[sel][..., 1, 2]) / (4 * w)
    q[sel, 1] = (m[sel][..., 0, 2] - m[sel][..., 2, 0]) / (4 * w)
    q[sel, 2] = (m[sel][..., 1, 0] - m[sel][..., 0, 1]) / (4 * w)
    q = np.where(q[..., 3:4] < 0, -q, q)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    vec = q[..., :3]
    norm = np.linalg.norm(vec, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(norm, q[..., 3:4])
    small = angle < 1e-3
    scale = np.where(small, 2.0 + angle**2 / 12.0, angle / np.sin(np.where(small, 1.0, angle / 2.0)))
    return vec * scale


def _pose(values: np.ndarray, fmt: ActionFormat) -> tuple[np.ndarray, np.ndarray]:
    """(..., 9 | 6) -> (rotation (..., 3, 3), translation (..., 3))."""
    if fmt == ActionFormat.XYZ_ROT6D:
        return rot6d_to_matrix(values[..., 3:9]), values[..., :3]
    return rotvec_to_matrix(values[..., 3:6]), values[..., :3]


def compose_poses(relative: np.ndarray, reference: np.ndarray, fmt: ActionFormat) -> np.ndarray:
    """reference (N, Dp) composed with each step of relative (N, H, Dp): T_ref @ T_rel, in the same format."""
    r_rel, t_rel = _pose(relative, fmt)
    r_ref, t_ref = _pose(reference, fmt)
    r = r_ref[:, None] @ r_rel
    t = (r_ref[:, None] @ t_rel[..., None])[..., 0] + t_ref[:, None]
    rot = r[..., :2, :].reshape(r.shape[:-2] + (6,)) if fmt == ActionFormat.XYZ_ROT6D else matrix_to_rotvec(r)
    return np.concatenate([t, rot], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------------------------


def _as_array(stats: Mapping[str, list], key: str) -> np.ndarray:
    return np.asarray(stats[key], dtype=np.float64)


@dataclass(frozen=True)
class _StateKey:
    key: str
    method: str
    lo: np.ndarray | None = None  # min/max (or q01/q99)
    hi: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


@dataclass(frozen=True)
class _ActionKey:
    key: str
    offset: int
    dim: int
    method: str
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    per_step: bool  # the statistics are (steps, D): relative_action's
    state_key: str | None  # relative to this state key
    pose: ActionFormat | None  # an end-effector pose (composed, not added)


class StateActionCodec:
    """One embodiment's normalisation: raw states -> model input, normalised model output -> physical actions."""

    def __init__(
        self,
        spec: EmbodimentSpec,
        *,
        max_state_dim: int,
        max_action_dim: int,
        model_action_horizon: int,
        use_percentiles: bool = False,
        clip_outliers: bool = True,
        apply_sincos_state_encoding: bool = False,
        use_relative_action: bool = False,
        where: str = "processor_config.json",
    ):
        self.spec = spec
        self.max_state_dim = int(max_state_dim)
        self.clip_outliers = bool(clip_outliers)
        mc = spec.modality_configs
        self.state_keys = list(mc["state"].modality_keys)
        self.action_keys = list(mc["action"].modality_keys)
        self.action_horizon = len(mc["action"].delta_indices)
        lo_name, hi_name = ("q01", "q99") if use_percentiles else ("min", "max")

        sincos = set(mc["state"].sin_cos_embedding_keys or ()) if apply_sincos_state_encoding else set()
        state_mean_std = set(mc["state"].mean_std_embedding_keys or ())
        self._state: list[_StateKey] = []
        width = 0
        for key in self.state_keys:
            st = spec.statistics["state"][key]
            if key in sincos:
                self._state.append(_StateKey(key, SIN_COS))
                width += 2 * spec.state_dims[key]
            elif key in state_mean_std:
                self._state.append(_StateKey(key, MEAN_STD, mean=_as_array(st, "mean"), std=_as_array(st, "std")))
                width += spec.state_dims[key]
            else:
                self._state.append(_StateKey(key, MIN_MAX, lo=_as_array(st, lo_name), hi=_as_array(st, hi_name)))
                width += spec.state_dims[key]
        if width > self.max_state_dim:
            raise CheckpointError(
                f"{where}: embodiment {spec.tag!r} encodes {width} state features, more than the model's "
                f"max_state_dim {self.max_state_dim}"
            )
        self.encoded_state_dim = width

        action_mean_std = set(mc["action"].mean_std_embedding_keys or ())
        configs = mc["action"].action_configs or [None] * len(self.action_keys)
        self._actions: list[_ActionKey] = []
        offset = 0
        for key, ac in zip(self.action_keys, configs):
            d = spec.action_dims[key]
            st = spec.statistics["action"][key]
            relative = ac is not None and ac.rep == ActionRepresentation.RELATIVE and use_relative_action
            state_key = pose = None
            per_step = False
            if relative:
                rel = spec.statistics.get("relative_action", {}).get(key)
                if rel is None:
                    raise CheckpointError(
                        f"statistics.json: action {key!r} of {spec.tag!r} is RELATIVE (use_relative_action), but "
                        f"'{spec.tag}.relative_action.{key}' is missing"
                    )
                st, per_step = rel, True
                lo, hi = _as_array(st, "min"), _as_array(st, "max")  # never percentiles for relative keys
                if lo.ndim == 2 and lo.shape[0] < self.action_horizon:
                    raise CheckpointError(
                        f"statistics.json: '{spec.tag}.relative_action.{key}' has {lo.shape[0]} steps, the "
                        f"embodiment's action horizon is {self.action_horizon}"
                    )
                state_key = ac.state_key or key
                if ac.type == ActionType.EEF:
                    if ac.format not in (ActionFormat.XYZ_ROT6D, ActionFormat.XYZ_ROTVEC):
                        raise CheckpointError(
                            f"{where}: action {key!r} is a RELATIVE end-effector action in format {ac.format.name}; "
                            "the native backend composes XYZ_ROT6D and XYZ_ROTVEC poses"
                        )
                    want = 9 if ac.format == ActionFormat.XYZ_ROT6D else 6
                    if d != want:
                        raise CheckpointError(f"{where}: action {key!r} ({ac.format.name}) has {d} dims, expected {want}")
                    pose = ac.format
                if state_key not in spec.state_dims or spec.state_dims[state_key] != d:
                    raise CheckpointError(
                        f"{where}: action {key!r} ({d} dims) is RELATIVE to state {state_key!r}, which "
                        f"{'has ' + str(spec.state_dims[state_key]) + ' dims' if state_key in spec.state_dims else 'is not a state key'}"
                    )
            else:
                lo, hi = _as_array(st, lo_name), _as_array(st, hi_name)
            mean, std = _as_array(st, "mean"), _as_array(st, "std")
            if per_step:
                lo, hi, mean, std = (a[: self.action_horizon] if a.ndim == 2 else a for a in (lo, hi, mean, std))
            method = MEAN_STD if key in action_mean_std else MIN_MAX
            self._actions.append(_ActionKey(key, offset, d, method, lo, hi, mean, std, per_step, state_key, pose))
            offset += d
        if offset > max_action_dim:
            raise CheckpointError(
                f"{where}: embodiment {spec.tag!r} has {offset} action dims, more than the model's max_action_dim "
                f"{max_action_dim}"
            )
        if self.action_horizon > model_action_horizon:
            raise CheckpointError(
                f"{where}: embodiment {spec.tag!r} asks for {self.action_horizon} action steps, the model makes "
                f"{model_action_horizon}"
            )
        self.action_dim = offset

    @classmethod
    def from_processor_kwargs(cls, spec: EmbodimentSpec, processor_kwargs: Mapping[str, object], config: object,
                              where: str = "processor_config.json") -> "StateActionCodec":
        """The codec a GR00T processor builds: switches from processor_config.json's ``processor_kwargs`` (NVIDIA's
        processor defaults where absent: min/max, clipping, no sin/cos, absolute actions), sizes from the model's
        config (``max_state_dim``, ``max_action_dim``, ``action_horizon``)."""
        kw = processor_kwargs
        return cls(
            spec,
            max_state_dim=config.max_state_dim,  # type: ignore[attr-defined]
            max_action_dim=config.max_action_dim,  # type: ignore[attr-defined]
            model_action_horizon=config.action_horizon,  # type: ignore[attr-defined]
            use_percentiles=bool(kw.get("use_percentiles", False)),
            clip_outliers=bool(kw.get("clip_outliers", True)),
            apply_sincos_state_encoding=bool(kw.get("apply_sincos_state_encoding", False)),
            use_relative_action=bool(kw.get("use_relative_action", False)),
            where=where,
        )

    # -- states ---------------------------------------------------------------------------------------------------
    def encode_states(self, states: Mapping[str, np.ndarray]) -> np.ndarray:
        """{key: float32 (N, T, D) raw} -> float32 (N, T, max_state_dim)."""
        parts = []
        for sk in self._state:
            x = np.asarray(states[sk.key], dtype=np.float32)
            if sk.method == SIN_COS:
                parts.append(np.concatenate([np.sin(x), np.cos(x)], axis=-1))
            elif sk.method == MEAN_STD:
                ok = sk.std != 0
                out = x.copy()
                out[..., ok] = (x[..., ok] - sk.mean[ok]) / sk.std[ok]
                parts.append(out)
            else:
                ok = ~np.isclose(sk.hi, sk.lo)
                out = np.zeros_like(x)
                out[..., ok] = (x[..., ok] - sk.lo[ok]) / (sk.hi[ok] - sk.lo[ok])
                out[..., ok] = 2 * out[..., ok] - 1
                if self.clip_outliers:
                    out = np.clip(out, -1.0, 1.0)
                parts.append(out)
        enc = np.concatenate(parts, axis=-1) if parts else np.zeros(self._batch_shape(states) + (0,), np.float32)
        padded = np.zeros(enc.shape[:-1] + (self.max_state_dim,), dtype=np.float32)
        padded[..., : enc.shape[-1]] = enc
        return padded

    @staticmethod
    def _batch_shape(states: Mapping[str, np.ndarray]) -> tuple[int, ...]:
        first = next(iter(states.values()), None)
        return tuple(first.shape[:-1]) if first is not None else (0, 1)

    # -- actions --------------------------------------------------------------------------------------------------
    @property
    def relative_actions(self) -> list[tuple[str, int, int]]:
        """(key, offset, width) in the normalised action vector of each action decoded relative to a state."""
        return [(ak.key, ak.offset, ak.dim) for ak in self._actions if ak.state_key is not None]

    def decode_actions(self, normalized: np.ndarray, states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """float32 (N, H_model, max_action_dim) normalised -> {key: float32 (N, horizon, D)} physical.
        ``states``: the raw states {key: (N, T, D)} (RELATIVE keys use the last step of theirs)."""
        a = np.asarray(normalized, dtype=np.float32)[:, : self.action_horizon]
        out: dict[str, np.ndarray] = {}
        for ak in self._actions:
            y = a[..., ak.offset : ak.offset + ak.dim]
            if ak.method == MEAN_STD:
                ok = ak.std != 0
                ok = np.broadcast_to(ok, y.shape[1:]) if ak.per_step else ok
                x = y.copy()
                if ak.per_step:
                    x[:, ok] = (y * ak.std + ak.mean)[:, ok]
                else:
                    x[..., ok] = y[..., ok] * ak.std[ok] + ak.mean[ok]
                x = x.astype(np.float64)
            else:
                x = (np.clip(y, -1.0, 1.0) + 1.0) / 2.0 * (ak.hi - ak.lo) + ak.lo
            if ak.state_key is not None:
                ref = np.asarray(states[ak.state_key], dtype=np.float32)[:, -1]
                x = compose_poses(x, ref.astype(np.float64), ak.pose) if ak.pose is not None else x + ref[:, None, :]
            out[ak.key] = np.ascontiguousarray(x, dtype=np.float32)
        return out

    def normalize_actions(self, actions: Mapping[str, np.ndarray], states: Mapping[str, np.ndarray]) -> np.ndarray:
        """Physical {key: (N, n, D)} (row j: step j of a chunk) -> normalised (N, n, action_dim), as NVIDIA's
        processor normalises actions: relative keys taken relative to the last raw state of their state key
        (re-anchored on the current state), clipped to [-1, 1] with ``clip_outliers``. The inverse of
        :meth:`decode_actions` inside the clip range."""
        parts = []
        for ak in self._actions:
            x = np.asarray(actions[ak.key], dtype=np.float64)
            if ak.state_key is not None:
                if ak.pose is not None:
                    raise ValueError(f"action.{ak.key}: relative end-effector poses cannot be re-normalised")
                x = x - np.asarray(states[ak.state_key], dtype=np.float64)[:, -1][:, None, :]
            lo, hi, mean, std = ak.lo, ak.hi, ak.mean, ak.std
            if ak.per_step:
                n = x.shape[1]
                lo, hi, mean, std = (v[:n] if v.ndim == 2 else v for v in (lo, hi, mean, std))
            if ak.method == MEAN_STD:
                y = np.where(std != 0, (x - mean) / np.where(std != 0, std, 1.0), x)
            else:
                span = hi - lo
                ok = ~np.isclose(hi, lo)
                y = np.where(ok, 2.0 * (x - lo) / np.where(ok, span, 1.0) - 1.0, 0.0)
            if self.clip_outliers:
                y = np.clip(y, -1.0, 1.0)
            parts.append(y.astype(np.float32))
        return np.concatenate(parts, axis=-1)


__all__ = ["StateActionCodec", "compose_poses", "matrix_to_rotvec", "rot6d_to_matrix", "rotvec_to_matrix"]
