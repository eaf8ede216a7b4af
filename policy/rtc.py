"""Real-time chunking (RTC) requests: the previous chunk's remaining actions continue into the new one.

The cheap form NVIDIA's N1.7 action head uses (inpainting, no guidance gradient): the first ``overlap`` rows of
the initial noise are replaced by the previous chunk's rows (normalised), and each Euler update of row j is
scaled by a weight: 0 for the ``frozen`` rows (they run anyway while the new chunk is computed), a ramp
(1 - e^(-r j/(K+1))) / (1 - e^(-r)) over the K = overlap - frozen rows after them, 1 for the rest. Requests with
and without RTC share one forward pass: a plain request has weight 1 everywhere.

Two request forms:

* ours, ``options["rtc"] = {"prev_actions": {key: float32 (B, n, D)}, "frozen_steps": d, "overlap_steps": o,
  "ramp_rate": r}``: physical actions of the previous chunk not executed yet, row 0 aligned to the new chunk's
  first step (o defaults to n, r to 6.0). Relative keys are re-anchored on the current state. The answer's
  first d rows ARE the given rows (exactly: the robot executes them anyway).
* upstream's (NVIDIA's ``Gr00tPolicy`` with RTC): the previous chunk's physical actions as the observation's
  ``action`` modality, with ``options`` ``rtc_frozen_steps``, ``rtc_overlap_steps`` and optionally
  ``rtc_ramp_rate`` and ``action_horizon`` (how many of the given rows are valid, default all). As upstream, the
  LAST ``overlap`` valid rows seed the new chunk, and the answer is decoded as it comes (relative keys of the
  frozen rows come out re-anchored on the new state).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .base import PolicyInputError

DEFAULT_RAMP_RATE = 6.0
RTC_KEYS = ("prev_actions", "frozen_steps", "overlap_steps", "ramp_rate")
UPSTREAM_KEYS = ("rtc_frozen_steps", "rtc_overlap_steps", "rtc_ramp_rate", "action_horizon")


@dataclass
class RTCRequest:
    prefix: np.ndarray  # (B, overlap, action_dim) normalised rows for the first `overlap` rows of x0
    frozen: int
    overlap: int
    ramp_rate: float
    exact_rows: dict[str, np.ndarray] | None  # ours: physical rows 0..frozen-1 the answer repeats exactly


def update_weights(horizon: int, frozen: int, overlap: int, ramp_rate: float) -> torch.Tensor:
    """(horizon,) float32 weights of each row's Euler updates (computed as NVIDIA's head does, in float32)."""
    w = torch.ones(horizon, dtype=torch.float32)
    w[:frozen] = 0.0
    k = overlap - frozen
    if k > 0:
        t = torch.linspace(0.0, 1.0, k + 2)
        ramp = 1 - torch.exp(-ramp_rate * t)
        w[frozen:overlap] = (ramp / ramp[-1].clamp_min(1e-8))[1:-1]
    return w


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PolicyInputError(f"{field}: expected an int in [{low}, {high}], got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise PolicyInputError(f"{field}: expected an int in [{low}, {high}], got {int(value)}")
    return int(value)


def _ramp(value: Any, field: str) -> float:
    if value is None:
        return DEFAULT_RAMP_RATE
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise PolicyInputError(f"{field}: expected a positive number, got {value!r:.40}")
    return float(value)


def _actions(value: Any, field: str, keys: list[str], dims: Mapping[str, int], batch: int, max_rows: int) -> dict:
    """{key: float32 (B, n, D)} with one n for every key, 1 <= n <= max_rows."""
    if not isinstance(value, Mapping):
        raise PolicyInputError(f"{field}: expected a map of action key -> float32 (B, n, D), got {type(value).__name__}")
    unknown = [k for k in value if k not in dims]
    if unknown:
        raise PolicyInputError(f"{field}: unknown action key(s) {', '.join(map(repr, unknown))}; expected {', '.join(keys)}")
    rows = None
    out = {}
    for key in keys:
        arr = value.get(key)
        want = f"float32 array of shape ({batch}, n, {dims[key]}) with 1 <= n <= {max_rows}"
        if not isinstance(arr, np.ndarray):
            raise PolicyInputError(f"{field}.{key}: expected {want}, got {'nothing' if arr is None else type(arr).__name__}")
        if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[0] != batch or arr.shape[2] != dims[key] \
                or not 1 <= arr.shape[1] <= max_rows:
            raise PolicyInputError(f"{field}.{key}: expected {want}, got {arr.dtype} {arr.shape}")
        if rows is not None and arr.shape[1] != rows:
            raise PolicyInputError(f"{field}.{key}: {arr.shape[1]} rows, the other keys have {rows}")
        if not np.isfinite(arr).all():
            raise PolicyInputError(f"{field}.{key}: expected finite values")
        rows = arr.shape[1]
        out[key] = arr
    return out


def parse_rtc(options: Mapping[str, Any], observation: Mapping[str, Any], batch: int, codec, states: Mapping[str, np.ndarray],
              horizon: int) -> RTCRequest | None:
    """The request's RTC, in either form, checked (PolicyInputError names the field); None without RTC.
    ``codec``: the embodiment's StateActionCodec; ``states``: the request's raw states; ``horizon``: the
    embodiment's action horizon (rows of the answer)."""
    keys, dims = codec.action_keys, codec.spec.action_dims
    if options.get("rtc") is not None:
        rtc = options["rtc"]
        if not isinstance(rtc, Mapping):
            raise PolicyInputError(f"options.rtc: expected a map with {', '.join(RTC_KEYS)}, got {type(rtc).__name__}")
        unknown = [k for k in rtc if k not in RTC_KEYS]
        if unknown:
            raise PolicyInputError(f"options.rtc: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(RTC_KEYS)}")
        prev = _actions(rtc.get("prev_actions"), "options.rtc.prev_actions", keys, dims, batch, horizon)
        n = next(iter(prev.values())).shape[1]
        overlap = _int(rtc.get("overlap_steps", n), "options.rtc.overlap_steps", 1, n)
        frozen = _int(rtc.get("frozen_steps"), "options.rtc.frozen_steps", 0, overlap)
        prefix = codec.normalize_actions({k: v[:, :overlap] for k, v in prev.items()}, states)
        exact = {k: v[:, :frozen] for k, v in prev.items()}
        return RTCRequest(prefix, frozen, overlap, _ramp(rtc.get("ramp_rate"), "options.rtc.ramp_rate"), exact)
    if options.get("rtc_frozen_steps") is None and options.get("rtc_overlap_steps") is None:
        return None
    given = observation.get("action") if isinstance(observation, Mapping) else None
    prev = _actions(given, "observation.action", keys, dims, batch, horizon)
    n = next(iter(prev.values())).shape[1]
    valid = _int(options.get("action_horizon", n), "options.action_horizon", 1, n)
    overlap = _int(options.get("rtc_overlap_steps"), "options.rtc_overlap_steps", 1, min(valid, horizon))
    frozen = _int(options.get("rtc_frozen_steps"), "options.rtc_frozen_steps", 0, overlap)
    normalised = codec.normalize_actions({k: v[:, :valid] for k, v in prev.items()}, states)
    return RTCRequest(normalised[:, valid - overlap:valid], frozen, overlap,
                      _ramp(options.get("rtc_ramp_rate"), "options.rtc_ramp_rate"), None)


__all__ = ["DEFAULT_RAMP_RATE", "RTCRequest", "parse_rtc", "update_weights"]
