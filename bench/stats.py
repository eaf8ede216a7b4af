"""The one summary of a list of measurements (latencies, forward times, ...) that every scenario reports, so a
p99 in one table means what it means in another: numpy's linear-interpolated percentiles, milliseconds (or
whatever the input is in) rounded to 3 decimals, None where there is nothing to summarise."""

from __future__ import annotations

from typing import Iterable

import numpy as np

DIGITS = 3
KEYS = ("n", "min", "mean", "p50", "p90", "p99", "max")


def _round(value: float) -> float:
    return round(float(value), DIGITS)


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, min, mean, p50, p90, p99 and max of `values` (the others None when it is empty)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if not arr.size:
        return {key: (0 if key == "n" else None) for key in KEYS}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"n": int(arr.size), "min": _round(arr.min()), "mean": _round(arr.mean()), "p50": _round(p50),
            "p90": _round(p90), "p99": _round(p99), "max": _round(arr.max())}


def percentile(values: Iterable[float], q: float) -> float | None:
    """One percentile (q in 0..100), computed and rounded as `summarize` does; None for no values."""
    arr = np.asarray(list(values), dtype=np.float64)
    return _round(np.percentile(arr, q)) if arr.size else None


def median(values: Iterable[float]) -> float | None:
    return percentile(values, 50)


def mean(values: Iterable[float]) -> float | None:
    arr = np.asarray(list(values), dtype=np.float64)
    return _round(arr.mean()) if arr.size else None
