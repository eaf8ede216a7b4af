"""Fixed-shape execution of the native model: batch-size buckets, padding to them, and the compile modes.

CUDA graphs and ``torch.compile`` pay off only when the shapes repeat, so with ``compile`` other than "none" a
batch of N samples runs at the smallest bucket >= N (rows repeated to fill it, their outputs dropped) and the
text at the processor's fixed ``max_text_length`` (instead of the longest text of the batch). Each sample's
output depends only on its own inputs (the model masks padding everywhere), so the padding changes no result
beyond float rounding.

Modes:
* ``none`` -- eager PyTorch, shapes as they come.
* ``torch_compile`` -- ``torch.compile(dynamic=False)``: fused kernels, one compiled graph per bucket.
* ``cuda_graphs`` -- ``torch.compile(mode="reduce-overhead")``: the same, replayed as CUDA graphs (one launch
  instead of thousands per call at n16-3b depth). CUDA only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

COMPILE_MODES = ("none", "torch_compile", "cuda_graphs")
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def check_compile_mode(mode: str, device: torch.device) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "cuda_graphs" and device.type != "cuda":
        raise ValueError(f"compile: 'cuda_graphs' needs a CUDA device, the policy runs on {device}")
    return mode


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"batch_buckets: expected positive batch sizes, got {list(buckets)!r}")
    return out


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of the largest."""
    for b in buckets:
        if b >= n:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its last row repeated until it has ``rows`` rows (real data, so nothing non-finite appears)."""
    n = t.shape[0]
    if n == rows:
        return t
    return torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])], dim=0)


def compiled_forward(model: torch.nn.Module, mode: str) -> Callable:
    """The callable that runs ``model.forward`` in ``mode`` (compilation happens lazily, per shape)."""
    if mode == "none":
        return model.forward
    compile_mode = "reduce-overhead" if mode == "cuda_graphs" else "default"
    return torch.compile(model.forward, dynamic=False, mode=compile_mode)


__all__ = ["COMPILE_MODES", "DEFAULT_BATCH_BUCKETS", "bucket_for", "check_buckets", "check_compile_mode",
           "compiled_forward", "pad_rows"]
