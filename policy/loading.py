"""`load_policy`: one entry point for every backend."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from typing import Any

from .base import DEFAULT_MAX_BATCH_PER_REQUEST, BasePolicy
from .checkpoint import N1D6, N1D7, check_directory, read_json

BACKENDS = ("native", "gr00t", "auto")
NATIVE_MODEL_TYPES = (N1D6, N1D7)
logger = logging.getLogger(__name__)


def gpu_present_without_cuda() -> str | None:
    """A warning when this machine has an NVIDIA GPU (driver device files or nvidia-smi) but torch cannot use
    it (a CPU build of torch, or a driver it does not support); None otherwise."""
    import torch

    if torch.cuda.is_available():
        return None
    if not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")):
        return None
    return (
        f"this machine has an NVIDIA GPU but torch {torch.__version__} cannot use it "
        f"(CUDA build: {torch.version.cuda or 'no, a CPU build'}); running on the CPU. Install a CUDA build of "
        f"torch (see README), or set device: cpu to silence this."
    )


def resolve_device(device: Any = "cpu") -> str:
    """"cpu", "cuda", "cuda:N", an int N (-> "cuda:N"), a torch.device, or "auto" (cuda if available, else cpu,
    with a logged warning when a GPU is there but torch cannot use it).

    N counts the GPUs this process sees. Under Ray that is only the GPUs assigned to the replica (Ray sets
    CUDA_VISIBLE_DEVICES from its ``num_gpus``), so in a replica ``cuda`` and ``cuda:0`` mean its first
    assigned GPU, never the machine's GPU 0."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, bool):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N', an int or 'auto', got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device: expected a non-negative CUDA index, got {device}")
        device = f"cuda:{device}"
    if not isinstance(device, str):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N', an int or 'auto', got {device!r}")
    d = device.strip().lower()
    if d == "auto":
        if torch.cuda.is_available():
            return "cuda"
        warning = gpu_present_without_cuda()
        if warning:
            logger.warning("device auto: %s", warning)
        return "cpu"
    if d == "cpu":
        return "cpu"
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
        if ":" in d and int(d[5:]) >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this process sees {torch.cuda.device_count()} CUDA device(s) (under Ray, only "
                f"the replica's assigned GPUs: num_gpus in ray_actor_options; cuda:0 is the first of them)"
            )
        return d
    raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N', an int or 'auto', got {device!r}")


def load_policy(
    model_path: str | os.PathLike,
    embodiment_tag: Any,
    *,
    device: Any = "cpu",
    strict: bool = True,
    backend: str = "native",
    dtype: Any = None,
    max_batch_per_request: int = DEFAULT_MAX_BATCH_PER_REQUEST,
    compile: str = "none",
    warmup: bool = True,
    tokenizer: str | os.PathLike | None = None,
    backbone_config: str | os.PathLike | None = None,
) -> BasePolicy:
    """Load a policy for one embodiment of a GR00T checkpoint (NVIDIA's layout).

    backend: "native" (our own model code: no Isaac-GR00T needed), "gr00t" (NVIDIA's Isaac-GR00T package, where
    installed) or "auto" (native for the model types it implements, else gr00t).
    tokenizer: the backbone's tokenizer folder (NVIDIA's checkpoints do not carry one; for N1.7 the Qwen3-VL
    processor folder, which also holds its chat template and image settings); backbone_config: the backbone's
    config.json, Eagle-style for N1.6, Qwen3-VL for N1.7 (default: the model_name folder's, for N1.7 else the
    tokenizer folder's, else the released backbone's sizes).
    dtype: None = bfloat16 on CUDA, float32 on CPU (native backend; gr00t picks its own).
    compile: "none", "torch_compile" or "cuda_graphs" (native backend; see policy.hot_path).
    warmup: run one dummy forward at B=1 before returning (native backend), so the first request does not pay
    for CUDA / cuBLAS initialisation or compilation.
    Errors: a bad path or broken checkpoint names the file; an unknown tag lists the checkpoint's tags.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(max_batch_per_request, int) or max_batch_per_request < 1:
        raise ValueError(f"max_batch_per_request: expected a positive int, got {max_batch_per_request!r}")
    dev = resolve_device(device)
    if backend == "auto":
        path = check_directory(model_path)
        cfg = read_json(path / "config.json")
        backend = "native" if isinstance(cfg, dict) and cfg.get("model_type") in NATIVE_MODEL_TYPES else "gr00t"
    if backend == "native":
        from .native import NativePolicy

        return NativePolicy(
            model_path, embodiment_tag, device=dev, dtype=dtype, strict=strict,
            max_batch_per_request=max_batch_per_request, compile=compile, warmup=warmup,
            tokenizer=tokenizer, backbone_config=backbone_config,
        )
    if compile != "none":
        raise ValueError(f"compile {compile!r}: only the native backend compiles (backend='gr00t' runs NVIDIA's policy)")
    if dtype is not None and str(dtype).lower().removeprefix("torch.") not in ("bfloat16", "bf16"):
        raise ValueError(f"dtype {dtype!r}: backend='gr00t' runs NVIDIA's policy in bfloat16 (leave dtype unset)")
    from .gr00t_backend import Gr00tBackendPolicy

    return Gr00tBackendPolicy(
        model_path, embodiment_tag, device=dev, strict=strict, max_batch_per_request=max_batch_per_request
    )
