"""The policy interface the serving layer calls, with the GR00T observation checks shared by every backend.

`BasePolicy` follows upstream GR00T's `BasePolicy` / `Gr00tPolicy` (`get_action`, `get_modality_config`,
`reset`, strict input / output checks) and adds `get_actions`: many requests, ONE forward pass.

Observation (the nested form of `clients.protocol`; the ingress converts the flat and N1.5 forms to it):
    {"video": {cam: uint8 (B, T_v, H, W, 3)}, "state": {key: float32 (B, T_s, D)},
     "language": {key: [[str]] * B}}            # also [str] * B or a tuple
An "action" modality in the observation is ignored (the N1.6 tutorial sends one).

Strict mode (default, upstream's recommendation during development) refuses any deviation; non-strict mode
casts state dtypes (float64, float16, ints -> float32) and integer video to uint8, and ignores unknown keys,
but still refuses what cannot run (missing keys, wrong T or D, non-finite values, disagreeing batch sizes).
"""

from __future__ import annotations

import abc
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from clients.modality import ModalityConfig
from clients.protocol import MODALITIES as _TOP_LEVEL  # the nested observation form, as the wire protocol defines it

DEFAULT_MAX_BATCH_PER_REQUEST = 64


class PolicyInputError(ValueError):
    """An observation or options map the policy refuses. The message names the key, what was expected and what
    came, e.g. "state.left_arm: expected float32 array of shape (B, 1, 7), got float64 (1, 1, 7)"."""


class PolicyOutputError(RuntimeError):
    """The model produced actions that break the action contract (strict mode). A server bug, not the client's."""


def _describe_value(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"{v.dtype} {tuple(v.shape)}"
    if v is None:
        return "null"
    if isinstance(v, (str, bytes)):
        return f"{type(v).__name__} {v!r:.40}"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} of length {len(v)}"
    return type(v).__name__


def _shape_str(dims: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def validate_options(options: Any) -> dict[str, Any]:
    """Options of a get_action request: a map or None. Known key: "seed" (an int). Unknown keys pass."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise PolicyInputError(f"options: expected a map or null, got {_describe_value(options)}")
    out = dict(options)
    if "seed" in out and out["seed"] is not None:
        seed = out["seed"]
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
            raise PolicyInputError(f"options.seed: expected an int, got {_describe_value(seed)}")
        out["seed"] = int(seed) % (1 << 64)
    return out


class BasePolicy(abc.ABC):
    """A policy for one embodiment. Subclasses implement `get_modality_config`, `describe` and `_infer`."""

    embodiment_tag: str
    strict: bool = True
    max_batch_per_request: int = DEFAULT_MAX_BATCH_PER_REQUEST

    # ---- what subclasses provide -------------------------------------------------------------------------------
    @abc.abstractmethod
    def get_modality_config(self) -> dict[str, ModalityConfig]:
        """{"video"|"state"|"action"|"language": ModalityConfig}."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain-data (msgpack-able) description of the policy, its inputs, outputs and model."""

    @abc.abstractmethod
    def _infer(
        self, observations: list[dict[str, Any]], options: list[dict[str, Any]], sizes: list[int]
    ) -> list[dict[str, np.ndarray]]:
        """Actions for already validated observations (one forward pass for all of them), one dict per request."""

    def prepare_request_options(self, options: dict[str, Any], batch_size: int, observation: Any,
                                clean: dict[str, Any]) -> dict[str, Any]:
        """A request's options checked against the model (e.g. the shape of options.noise) and parsed for
        `_infer` (``observation``: as the request sent it; ``clean``: validated). Raises PolicyInputError. Runs
        per request, before the batch's forward pass."""
        return options

    @property
    def state_dims(self) -> dict[str, int] | None:
        """{state key: D} when known (checked in validation), else None."""
        return None

    @property
    def action_dims(self) -> dict[str, int] | None:
        return None

    # ---- public API ----------------------------------------------------------------------------------------------
    def reset(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The policy is stateless: nothing to reset. Returns an (empty) info dict, as upstream."""
        if options is not None and not isinstance(options, Mapping):
            raise PolicyInputError(f"options: expected a map or null, got {_describe_value(options)}")
        return {}

    def get_action(
        self, observation: dict[str, Any], options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Actions for one observation (B >= 1 samples): ({key: float32 (B, horizon, D)}, info)."""
        return self.get_actions([(observation, options)])[0]  # type: ignore[return-value]

    def get_actions(
        self,
        requests: Sequence[tuple[dict[str, Any], dict[str, Any] | None]],
        *,
        return_exceptions: bool = False,
    ) -> list[tuple[dict[str, np.ndarray], dict[str, Any]] | Exception]:
        """Actions for many requests in ONE forward pass (total samples = the sum of the requests' B).

        Each request is `(observation, options)` (a bare observation map is taken as `(observation, None)`).
        With `return_exceptions=True` an invalid request gets its exception in its slot and the others still
        run; otherwise the first error is raised.
        """
        results: list[Any] = [None] * len(requests)
        valid: list[tuple[int, dict[str, Any], dict[str, Any], int]] = []
        for i, req in enumerate(requests):
            try:
                obs, opts = self._split_request(req, i)
                opts = validate_options(opts)
                clean, b = self._prepare_observation(obs)
                opts = self.prepare_request_options(opts, b, obs, clean)
                valid.append((i, clean, opts, b))
            except Exception as exc:  # noqa: BLE001 - isolate the request when asked to
                if not return_exceptions:
                    raise
                results[i] = exc
        if not valid:
            return results
        try:
            actions = self._infer([v[1] for v in valid], [v[2] for v in valid], [v[3] for v in valid])
            if len(actions) != len(valid):
                raise PolicyOutputError(f"backend returned {len(actions)} results for {len(valid)} requests")
        except Exception as exc:  # noqa: BLE001
            if not return_exceptions:
                raise
            for i, *_ in valid:
                results[i] = exc
            return results
        for (i, _, _, b), action in zip(valid, actions):
            try:
                if self.strict:
                    self.validate_action(action, b)
                results[i] = (action, {})
            except Exception as exc:  # noqa: BLE001
                if not return_exceptions:
                    raise
                results[i] = exc
        return results

    def validate_observation(self, observation: Any) -> int:
        """Check an observation against the modality config; returns its batch size B (raises PolicyInputError)."""
        return self._prepare_observation(observation)[1]

    def validate_action(self, action: Mapping[str, Any], batch_size: int | None = None) -> None:
        """Every action key present, float32 (B, horizon, D). Raises PolicyOutputError."""
        mc = self.get_modality_config()["action"]
        horizon = len(mc.delta_indices)
        dims = self.action_dims or {}
        if not isinstance(action, Mapping):
            raise PolicyOutputError(f"action: expected a map of key -> array, got {_describe_value(action)}")
        for key in mc.modality_keys:
            d = dims.get(key)
            want = _shape_str(["B" if batch_size is None else batch_size, horizon, "D" if d is None else d])
            if key not in action:
                raise PolicyOutputError(f"action.{key}: expected float32 array of shape {want}, got nothing")
            arr = action[key]
            ok = (
                isinstance(arr, np.ndarray)
                and arr.dtype == np.float32
                and arr.ndim == 3
                and arr.shape[1] == horizon
                and (batch_size is None or arr.shape[0] == batch_size)
                and (d is None or arr.shape[2] == d)
            )
            if not ok:
                raise PolicyOutputError(f"action.{key}: expected float32 array of shape {want}, got {_describe_value(arr)}")

    def dummy_observation(
        self, batch_size: int = 1, *, height: int | None = None, width: int | None = None, seed: int = 0,
        text: str = "pick the pear from the counter and place it in the plate",
    ) -> dict[str, Any]:
        """A valid random observation (for warm-up, tests and benchmarks)."""
        rng = np.random.default_rng(seed)
        mc = self.get_modality_config()
        desc_size = None
        try:
            desc_size = self.describe().get("image_size")
        except Exception:  # noqa: BLE001
            pass
        h = height or (desc_size[0] if desc_size else 224)
        w = width or (desc_size[1] if desc_size else 224)
        tv, ts = len(mc["video"].delta_indices), len(mc["state"].delta_indices)
        dims = self.state_dims or {}
        return {
            "video": {
                k: rng.integers(0, 256, size=(batch_size, tv, h, w, 3), dtype=np.uint8) for k in mc["video"].modality_keys
            },
            "state": {
                k: rng.uniform(-1, 1, size=(batch_size, ts, dims.get(k, 1))).astype(np.float32)
                for k in mc["state"].modality_keys
            },
            "language": {k: [[text]] * batch_size for k in mc["language"].modality_keys},
        }

    # ---- validation ------------------------------------------------------------------------------------------------
    @staticmethod
    def _split_request(req: Any, index: int) -> tuple[Any, Any]:
        if isinstance(req, Mapping):
            return req, None
        if isinstance(req, (tuple, list)) and len(req) == 2:
            return req[0], req[1]
        raise PolicyInputError(
            f"request {index}: expected an (observation, options) pair, got {_describe_value(req)}"
        )

    def _prepare_observation(self, observation: Any) -> tuple[dict[str, Any], int]:
        """Validate; return the canonical observation ({"video", "state", "language": {key: [str] * B}}) and B."""
        strict = self.strict
        mc = self.get_modality_config()
        if not isinstance(observation, Mapping):
            raise PolicyInputError(
                f"observation: expected a map with keys video, state, language, got {_describe_value(observation)}"
            )
        if strict:
            extra = [k for k in observation if k not in _TOP_LEVEL and k != "action"]
            if extra:
                raise PolicyInputError(
                    f"observation: unexpected key(s) {', '.join(repr(k) for k in extra)}; expected video, state, "
                    f"language (strict mode)"
                )
        batch_of: dict[str, int] = {}  # "video.cam" -> B, in check order
        clean: dict[str, dict[str, Any]] = {"video": {}, "state": {}, "language": {}}

        sections: dict[str, Mapping[str, Any]] = {}
        for modality in _TOP_LEVEL:
            keys = mc[modality].modality_keys
            section = observation.get(modality)
            if section is None:
                if keys:
                    raise PolicyInputError(
                        f"{modality}: expected a map with key(s) {', '.join(keys)}, got nothing (missing '{modality}')"
                    )
                section = {}
            if not isinstance(section, Mapping):
                raise PolicyInputError(
                    f"{modality}: expected a map with key(s) {', '.join(keys)}, got {_describe_value(section)}"
                )
            if strict:
                extra = [k for k in section if k not in keys]
                if extra:
                    raise PolicyInputError(
                        f"{modality}: unexpected key(s) {', '.join(repr(k) for k in extra)}; expected "
                        f"{', '.join(keys) or 'none'} (strict mode)"
                    )
            sections[modality] = section

        # ---- video
        tv = len(mc["video"].delta_indices)
        for key in mc["video"].modality_keys:
            name = f"video.{key}"
            want = f"uint8 array of shape (B, {tv}, H, W, 3)"
            if key not in sections["video"]:
                raise PolicyInputError(f"{name}: expected {want}, got nothing (missing key)")
            arr = sections["video"][key]
            if not isinstance(arr, np.ndarray):
                raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(arr)}")
            if arr.dtype != np.uint8:
                if strict or arr.dtype.kind not in "iu" or arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(arr)}")
                arr = arr.astype(np.uint8)
            if arr.ndim != 5 or arr.shape[1] != tv or arr.shape[4] != 3 or arr.shape[2] < 1 or arr.shape[3] < 1:
                hint = ""
                if arr.ndim == 5 and arr.shape[1] != tv:
                    hint = f" (T must be {tv} = len(video delta_indices))"
                elif arr.ndim == 5 and arr.shape[4] != 3:
                    hint = " (3 RGB channels last)"
                raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(arr)}{hint}")
            batch_of[name] = arr.shape[0]
            clean["video"][key] = arr

        # ---- state
        ts = len(mc["state"].delta_indices)
        dims = self.state_dims or {}
        for key in mc["state"].modality_keys:
            name = f"state.{key}"
            d = dims.get(key)
            want = f"float32 array of shape (B, {ts}, {'D' if d is None else d})"
            if key not in sections["state"]:
                raise PolicyInputError(f"{name}: expected {want}, got nothing (missing key)")
            arr = sections["state"][key]
            if not isinstance(arr, np.ndarray):
                raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(arr)}")
            if arr.dtype != np.float32:
                same = arr.dtype.kind == "f" and arr.dtype.itemsize == 4  # float32, other byte order
                if not same and (strict or arr.dtype.kind not in "fiu"):
                    raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(arr)}")
                arr = arr.astype(np.float32)
            if arr.ndim != 3 or arr.shape[1] != ts or (d is not None and arr.shape[2] != d):
                hint = ""
                if arr.ndim == 3 and arr.shape[1] != ts:
                    hint = f" (T must be {ts} = len(state delta_indices))"
                raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(arr)}{hint}")
            if not np.isfinite(arr).all():
                bad = np.argwhere(~np.isfinite(arr))[0]
                kind = "NaN" if np.isnan(arr[tuple(bad)]) else "Inf"
                raise PolicyInputError(f"{name}: expected finite values, got {kind} at index {list(map(int, bad))}")
            batch_of[name] = arr.shape[0]
            clean["state"][key] = arr

        # ---- language
        nl = len(mc["language"].delta_indices)
        for key in mc["language"].modality_keys:
            name = f"language.{key}"
            want = f"a list of B lists of {nl} string" + ("s" if nl != 1 else "")
            if key not in sections["language"]:
                raise PolicyInputError(f"{name}: expected {want}, got nothing (missing key)")
            value = sections["language"][key]
            if isinstance(value, np.ndarray) and not strict and value.dtype.kind in "US":
                value = value.tolist()
            if not isinstance(value, (list, tuple)):
                raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(value)}")
            texts = []
            for j, item in enumerate(value):
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, (list, tuple)) and len(item) == nl and all(isinstance(s, str) for s in item):
                    texts.append(item[0])
                else:
                    raise PolicyInputError(f"{name}: expected {want}, got {_describe_value(item)} at [{j}]")
            batch_of[name] = len(texts)
            clean["language"][key] = texts

        if not batch_of:
            raise PolicyInputError("observation: the modality config names no inputs")
        sizes = set(batch_of.values())
        if len(sizes) > 1:
            (k1, b1), *rest = batch_of.items()
            k2, b2 = next((k, b) for k, b in rest if b != b1)
            raise PolicyInputError(f"batch sizes disagree: {k1} has B={b1}, {k2} has B={b2}")
        b = sizes.pop()
        if b < 1:
            raise PolicyInputError(f"{next(iter(batch_of))}: expected a batch of at least 1 sample, got B=0")
        if b > self.max_batch_per_request:
            raise PolicyInputError(
                f"{next(iter(batch_of))}: expected at most {self.max_batch_per_request} samples per request "
                f"(max_batch_per_request), got B={b}"
            )
        return clean, b
