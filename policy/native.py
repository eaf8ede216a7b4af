"""NativePolicy: our own GR00T-N1.6-shaped model (policy.modeling) behind the BasePolicy interface.

One `get_actions` call = one preprocess (all requests' samples together), one `model.get_action`, one decode,
then the actions are split back per request. Flow-matching noise is drawn per request on the CPU (a
`torch.Generator` seeded with the request's `options["seed"]`, or from os.urandom without one), so a seeded
request gives the same actions alone or batched with others.
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
    ):
        t0 = time.perf_counter()
        self.strict = bool(strict)
        self.max_batch_per_request = int(max_batch_per_request)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
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
            model = FleetGr00tModel.from_pretrained(str(info.path), dtype=self.dtype)
        except Exception as exc:  # noqa: BLE001 - name the files whatever transformers raised
            raise CheckpointError(
                f"checkpoint {info.path / 'model.safetensors'}: cannot load the model ({type(exc).__name__}: {exc})"
            ) from exc
        model.eval()
        model.to(device=self.device, dtype=self.dtype)
        self.model = model
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
        self.load_seconds = time.perf_counter() - t0

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
        }
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
        noise = torch.cat([self._noise(b, o) for b, o in zip(sizes, options)], dim=0)
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            noise = noise.pin_memory().to(self.device, dtype=self.dtype, non_blocking=True)
        else:
            noise = noise.to(self.dtype)
        states = self.processor.collect_states(observations)
        with torch.inference_mode():
            inputs = self.processor.preprocess(observations, device=self.device, dtype=self.dtype, states=states)
            normalized = self.model.get_action(noise=noise, **inputs)
            normalized = normalized.float().cpu()
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


__all__ = ["NativePolicy", "resolve_dtype"]
