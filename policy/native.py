"""NativePolicy: our own GR00T-N1.6-shaped model (policy.modeling) behind the BasePolicy interface.

One `get_actions` call = one preprocess (all requests' samples together), one `model.get_action`, one decode,
then the actions are split back per request. Flow-matching noise is drawn per request on the CPU in float32 (a
`torch.Generator` seeded with the request's `options["seed"]`, or from os.urandom without one), so a seed gives
the same noise on every device and dtype, and a seeded request the same actions alone or batched with others.

Precision: the weights and activations run in the policy's dtype; the noise, the Euler integration and the
decoding to physical units stay in float32. How close a request computed alone comes to the same request in a
batch (``BATCH_INVARIANCE_ATOL``, on normalised actions, whose range is about [-1, 1]): float32 1e-5; bfloat16
and float16 5e-2 -- matmul kernels pick other blockings for other batch sizes, and in 16-bit floats that
rounding difference (about 4e-3 per op) compounds through the backbone and the Euler steps. Checked on the CPU
by tests/test_inference_path.py; on a GPU bf16 is expected near 1e-2, and bench/gpu_check.py measures it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from clients.modality import ModalityConfig

from .base import DEFAULT_MAX_BATCH_PER_REQUEST, BasePolicy
from .checkpoint import CheckpointError, read_checkpoint
from .embodiment import resolve_tag
from .hot_path import DEFAULT_BATCH_BUCKETS, bucket_for, check_buckets, check_compile_mode, compiled_forward, pad_rows
from .processor import Processor

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


BATCH_INVARIANCE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def _from_pretrained_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # `dtype` replaced `torch_dtype` in 4.56


_DTYPE_KWARG = _from_pretrained_dtype_kwarg()


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; else a torch.dtype or one of float32/fp32/bfloat16/bf16/float16/fp16."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected a floating dtype (float32, bfloat16, float16), got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype: expected one of float32, bfloat16, float16 (or a torch.dtype), got {dtype!r}")


class NativePolicy(BasePolicy):
    """A checkpoint of ours (model_type "fleet_gr00t") for one embodiment tag."""

    backend = "native"

    def __init__(
        self,
        model_path: str | os.PathLike,
        embodiment_tag: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: Any = None,
        strict: bool = True,
        max_batch_per_request: int = DEFAULT_MAX_BATCH_PER_REQUEST,
        compile: str = "none",
        batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS,
        warmup: bool = True,
    ):
        t0 = time.perf_counter()
        self.strict = bool(strict)
        self.max_batch_per_request = int(max_batch_per_request)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.compile = check_compile_mode(compile, self.device)
        self.batch_buckets = check_buckets(batch_buckets)
        info = read_checkpoint(model_path)
        self.checkpoint = info
        self.model_path = str(info.path)
        cfg_path = info.path / "config.json"
        if info.model_type != "fleet_gr00t":
            raise CheckpointError(
                f"checkpoint {cfg_path}: model_type is {info.model_type!r}, the native backend loads 'fleet_gr00t' "
                f"checkpoints (use backend='gr00t' for NVIDIA GR00T checkpoints)"
            )
        self.embodiment_tag = resolve_tag(embodiment_tag)
        self.spec = info.embodiment(self.embodiment_tag)  # unknown tag -> error listing the checkpoint's tags

        from .modeling import FleetGr00tModel  # registers the model with AutoConfig / AutoModel

        try:
            model = FleetGr00tModel.from_pretrained(str(info.path), **{_DTYPE_KWARG: self.dtype})
        except Exception as exc:  # noqa: BLE001 - name the files whatever transformers raised
            raise CheckpointError(
                f"checkpoint {info.path / 'model.safetensors'}: cannot load the model ({type(exc).__name__}: {exc})"
            ) from exc
        model.eval()
        # Device only: from_pretrained already gave the weights their dtype, and a second .to(dtype) would also
        # round the float32 RoPE frequency buffers (inv_freq) to bf16 -- ~0.2 rad of angle error at position 192.
        model.to(device=self.device)
        self.model = model
        # the constant per-step embeddings, computed eagerly before any compiled graph could trace their cache
        model.action_head.step_embeddings(model.config.num_inference_timesteps, self.dtype)
        self._forward = compiled_forward(model, self.compile)
        cfg = model.config
        if self.spec.embodiment_id >= cfg.max_num_embodiments:
            raise CheckpointError(
                f"checkpoint {info.path / 'embodiment_id.json'}: {self.embodiment_tag} has id {self.spec.embodiment_id}, "
                f"the model has {cfg.max_num_embodiments} embodiment slots"
            )
        if info.image_size != cfg.image_size:
            raise CheckpointError(
                f"checkpoint {info.path / 'processor_config.json'}: image_size {info.image_size} != the model's "
                f"image_size {cfg.image_size} ({cfg_path})"
            )
        from .checkpoint import load_tokenizer

        tokenizer = load_tokenizer(info.path)
        if len(tokenizer) > cfg.llm_config.vocab_size:
            raise CheckpointError(
                f"checkpoint {info.path / 'tokenizer.json'}: {len(tokenizer)} tokens, more than the model's vocabulary "
                f"of {cfg.llm_config.vocab_size}"
            )
        self.processor = Processor.from_checkpoint(
            info,
            self.embodiment_tag,
            tokenizer=tokenizer,
            max_state_dim=cfg.max_state_dim,
            max_action_dim=cfg.max_action_dim,
            model_action_horizon=cfg.action_horizon,
        )
        self._parameters = int(sum(p.numel() for p in model.parameters()))
        self.warmup_seconds: float | None = None
        if warmup:
            self.warmup()
        self.load_seconds = time.perf_counter() - t0

    def set_compile(self, mode: str, batch_buckets: tuple[int, ...] | None = None) -> None:
        """Switch the execution mode (see policy.hot_path) without reloading the weights."""
        self.compile = check_compile_mode(mode, self.device)
        if batch_buckets is not None:
            self.batch_buckets = check_buckets(batch_buckets)
        self._forward = compiled_forward(self.model, self.compile)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """One dummy forward per batch size (CUDA context, cuBLAS handles, kernel selection, compilation), so
        the first robot does not pay for them. Returns (and records in ``warmup_seconds``) the time taken."""
        t0 = time.perf_counter()
        for b in batch_sizes:
            self.get_actions([(self.dummy_observation(b), {"seed": 0})])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    # ---- BasePolicy ------------------------------------------------------------------------------------------------
    def get_modality_config(self) -> dict[str, ModalityConfig]:
        return dict(self.spec.modality_configs)

    @property
    def state_dims(self) -> dict[str, int]:
        return dict(self.spec.state_dims)

    @property
    def action_dims(self) -> dict[str, int]:
        return dict(self.spec.action_dims)

    def describe(self) -> dict[str, Any]:
        mc = self.spec.modality_configs
        model: dict[str, Any] = {
            "backend": self.backend,
            "path": self.model_path,
            "model_type": str(self.model.config.model_type),
            "parameters": self._parameters,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "embodiment_id": int(self.spec.embodiment_id),
            "compile": self.compile,
            "load_seconds": round(float(getattr(self, "load_seconds", 0.0)), 3),
            "warmup_seconds": None if self.warmup_seconds is None else round(self.warmup_seconds, 3),
        }
        if self.device.type == "cuda":
            model["device_name"] = torch.cuda.get_device_name(self.device)
        demo = self.checkpoint.processor_config.get("fleet_demo")
        if isinstance(demo, dict) and isinstance(demo.get("preset"), str):
            model["preset"] = demo["preset"]
        return {
            "embodiment_tag": self.embodiment_tag,
            "modality_config": {m: mc[m].to_json() for m in ("video", "state", "action", "language")},
            "state_dims": dict(self.spec.state_dims),
            "action_dims": dict(self.spec.action_dims),
            "action_horizon": int(self.processor.action_horizon),
            "video_keys": list(self.processor.video_keys),
            "language_keys": list(self.spec.language_keys),
            "image_size": [self.processor.image_size, self.processor.image_size],
            "strict": bool(self.strict),
            "max_batch_per_request": int(self.max_batch_per_request),
            "model": model,
        }

    def _noise(self, batch_size: int, options: dict[str, Any]) -> torch.Tensor:
        cfg = self.model.config
        seed = options.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        return torch.randn((batch_size, cfg.action_horizon, cfg.max_action_dim), generator=gen, dtype=torch.float32)

    def _infer(
        self, observations: list[dict[str, Any]], options: list[dict[str, Any]], sizes: list[int]
    ) -> list[dict[str, np.ndarray]]:
        # float32 noise on every device and dtype: a seed means the same starting point everywhere
        noise = torch.cat([self._noise(b, o) for b, o in zip(sizes, options)], dim=0)
        n = noise.shape[0]
        if self.device.type == "cuda":
            noise = noise.pin_memory().to(self.device, non_blocking=True)
        fixed = self.compile != "none"
        states = self.processor.collect_states(observations)
        with torch.inference_mode():
            inputs = self.processor.preprocess(
                observations, device=self.device, dtype=self.dtype, states=states, fixed_text_length=fixed
            )
            inputs["noise"] = noise
            if fixed:  # one shape per bucket: the compiled graph (or CUDA graph) is reused
                rows = bucket_for(n, self.batch_buckets)
                inputs = {k: pad_rows(v, rows) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            normalized = self._forward(**inputs)[:n].cpu()  # float32 already: the one device-to-host copy
        actions = self.processor.decode_actions(normalized, states)
        out: list[dict[str, np.ndarray]] = []
        start = 0
        for b in sizes:
            out.append({k: np.ascontiguousarray(v[start : start + b]) for k, v in actions.items()})
            start += b
        return out

    def __repr__(self) -> str:
        return (
            f"NativePolicy(path={self.model_path!r}, embodiment_tag={self.embodiment_tag!r}, device={str(self.device)!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')!r}, strict={self.strict})"
        )


__all__ = ["BATCH_INVARIANCE_ATOL", "NativePolicy", "resolve_dtype"]
