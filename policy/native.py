"""NativePolicy: a GR00T checkpoint as NVIDIA writes it, run by our own model code, behind BasePolicy.

One ``get_actions`` call = one pre-processing of all requests' samples together, one forward pass, one
decoding, then the actions are split back per request.

Initial noise: ``options["noise"]`` when a request carries it (float32 (B, action_horizon, max_action_dim), as
NVIDIA's head draws it: the reply is then deterministic and comparable with any implementation); else drawn on
the CPU in float32 from a ``torch.Generator`` seeded with ``options["seed"]`` (from os.urandom without one), so
a seed gives the same noise on every device and dtype, alone or batched, and no global RNG is touched.

Precision: weights and activations in the policy's dtype; the noise, the Euler integration and the decoding
in float32. How close a request computed alone comes to the same request in a batch
(``BATCH_INVARIANCE_ATOL``, on normalised actions, range about [-1, 1]): float32 1e-5; bfloat16 and float16
5e-2 (other batch sizes pick other matmul blockings, and 16-bit rounding compounds through the backbone and
the Euler steps). Checked on the CPU by the tests; bench/gpu_check.py measures it on a GPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.modality import ModalityConfig

from .base import DEFAULT_MAX_BATCH_PER_REQUEST, BasePolicy, PolicyInputError
from .checkpoint import N1D6, N1D7, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, CheckpointError, CheckpointInfo, read_checkpoint
from .embodiment import resolve_tag
from .hot_path import DEFAULT_BATCH_BUCKETS, bucket_for, check_buckets, check_compile_mode, compiled_forward
from .rtc import parse_rtc, update_weights
from .tokenization import TOKENIZER_HINT, has_tokenizer, load_chat_template, load_tokenizer

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

BATCH_INVARIANCE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# Prompt lengths are rounded up to this under compiled execution: few shapes, few compilations.
COMPILED_TEXT_MULTIPLE = 64
RTC_OPTION = "_rtc"  # where prepare_request_options leaves a request's parsed RTC for _infer


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


def weights_path(path: Path) -> Path:
    """model.safetensors, or the shard index where the weights are sharded (what an error names)."""
    index = path / WEIGHTS_INDEX_FILE
    return index if index.is_file() and not (path / WEIGHTS_FILE).is_file() else path / WEIGHTS_FILE


def backbone_folder(info: CheckpointInfo) -> Path | None:
    """The folder ``model_name`` points at, when it is a local directory (absolute, or relative to the
    checkpoint): N1.7 checkpoints and our demo checkpoints name their backbone / tokenizer folder that way."""
    name = info.config.get("model_name", info.processor_kwargs.get("model_name"))
    if not isinstance(name, str) or not name:
        return None
    p = Path(name).expanduser()
    if not p.is_absolute():
        p = info.path / p
    return p if p.is_dir() else None


@dataclass
class BackboneSources:
    """Where a checkpoint's backbone dimensions and tokenizer come from."""

    config_file: Path | None  # None: the generation's built-in dimensions
    tokenizer_dir: Path | None  # None: a tokenizer object was handed in
    tokenizer: Any = None

    def load_tokenizer(self) -> tuple[Any, str | None]:
        """(the tokenizer, its chat template or None)."""
        if self.tokenizer_dir is None:
            template = getattr(self.tokenizer, "chat_template", None)
            return self.tokenizer, template if isinstance(template, str) else None
        return load_tokenizer(self.tokenizer_dir), load_chat_template(self.tokenizer_dir)

    @classmethod
    def resolve(cls, info: CheckpointInfo, tokenizer: Any, backbone_config: str | os.PathLike | None) -> "BackboneSources":
        folder = backbone_folder(info)
        if backbone_config is not None:
            config_file = Path(backbone_config).expanduser()
            if config_file.is_dir():
                config_file = config_file / "config.json"
            if not config_file.is_file():
                raise CheckpointError(f"backbone_config {config_file}: file not found")
        elif folder is not None and (folder / "config.json").is_file():
            config_file = folder / "config.json"
        else:
            config_file = None
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return cls(config_file, None, tokenizer)  # a loaded tokenizer (duck-typed: __call__, convert_tokens_to_ids)
        if tokenizer is not None:
            tok = Path(tokenizer).expanduser()
        elif folder is not None and has_tokenizer(folder):
            tok = folder
        else:
            raise CheckpointError(
                f"checkpoint {info.path}: GR00T checkpoints do not carry their tokenizer; {TOKENIZER_HINT}"
            )
        return cls(config_file, tok)


def _load_n1d6(info: CheckpointInfo, spec: Any, sources: BackboneSources, dtype: torch.dtype, device: torch.device):
    from .configuration_gr00t_n1d6 import ConfigError, EagleBackboneConfig, Gr00tN1d6Config
    from .modeling_gr00t_n1d6 import load_model
    from .processing_gr00t_n1d6 import Gr00tN1d6Processor

    try:
        config = Gr00tN1d6Config.from_checkpoint_dict(info.config, str(info.path / "config.json"))
        backbone = EagleBackboneConfig.from_file(sources.config_file) if sources.config_file else EagleBackboneConfig()
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        model = load_model(info.path, config, backbone, dtype=dtype, device=device)
    except Exception as exc:  # noqa: BLE001 - name the file whatever safetensors or torch raised
        raise CheckpointError(f"checkpoint {weights_path(info.path)}: cannot load the weights "
                              f"({type(exc).__name__}: {exc})") from None
    tokenizer, template = sources.load_tokenizer()
    processor = Gr00tN1d6Processor(spec, info.processor_kwargs, config, backbone, tokenizer, template,
                                   where=str(info.path / "processor_config.json"))
    return model, processor


def _load_n1d7(info: CheckpointInfo, spec: Any, sources: BackboneSources, dtype: torch.dtype, device: torch.device):
    from .configuration_gr00t_n1d6 import ConfigError
    from .configuration_gr00t_n1d7 import Gr00tN1d7Config
    from .modeling_gr00t_n1d7 import N17ModelError, load_model, qwen3_vl_classes, read_backbone_config
    from .processing_gr00t_n1d7 import PREPROCESSOR_FILE, Gr00tN1d7Processor, N17InputError

    qwen3_vl_classes()  # an ImportError naming the transformers version N1.7 needs, before anything is read
    # N1.7's prompt and image settings live beside its tokenizer (the Qwen3-VL processor folder model_name names).
    folder = sources.tokenizer_dir or backbone_folder(info)
    if folder is None or not (folder / PREPROCESSOR_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {info.path}: GR00T N1.7 needs its Qwen3-VL processor folder (tokenizer.json, chat template, "
            f"{PREPROCESSOR_FILE}; `tokenizer:`), found {folder or 'none'}"
        )
    if sources.config_file is None and (folder / "config.json").is_file():
        # That folder is the Qwen3-VL processor folder: its config.json is the backbone's (as in NVIDIA's layout).
        sources.config_file = folder / "config.json"
    try:  # the JSON side first: a mismatch is named before seconds of weight loading
        config = Gr00tN1d7Config.from_checkpoint_dict(info.config, str(info.path / "config.json"))
        backbone = read_backbone_config(sources.config_file)
        processor = Gr00tN1d7Processor(
            spec, info.processor_kwargs, config, folder, tokenizer=sources.tokenizer,
            image_token_id=backbone.get("image_token_id"), where=str(info.path / "processor_config.json"),
        )
        model = load_model(info.path, config, backbone, dtype=dtype, device=device)
    except (ConfigError, N17ModelError, N17InputError) as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - name the checkpoint whatever safetensors or torch raised
        raise CheckpointError(f"checkpoint {info.path}: cannot load the weights ({type(exc).__name__}: {exc})") from None
    return model, processor


# One loader per model_type: (checkpoint, embodiment, backbone sources, dtype, device) -> (model, processor).
# The model: forward(**processor inputs, noise) -> normalised actions, and a `config` with action_horizon,
# max_action_dim and max_num_embodiments. The processor: collate, pad_rows, decode_actions, model_image_size.
LOADERS = {N1D6: _load_n1d6, N1D7: _load_n1d7}


class NativePolicy(BasePolicy):
    """One embodiment of a GR00T checkpoint (NVIDIA's layout), on our own model code."""

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
        tokenizer: Any = None,
        backbone_config: str | os.PathLike | None = None,
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
        self.embodiment_tag = resolve_tag(embodiment_tag)
        self.spec = info.embodiment(self.embodiment_tag)  # unknown tag -> error listing the checkpoint's tags
        self.sources = BackboneSources.resolve(info, tokenizer, backbone_config)
        loader = LOADERS.get(info.model_type)
        if loader is None:
            raise CheckpointError(
                f"checkpoint {info.path / 'config.json'}: model_type {info.model_type!r} is not served natively; "
                f"native: {', '.join(LOADERS)}"
            )
        self.model, self.processor = loader(info, self.spec, self.sources, self.dtype, self.device)
        if self.spec.embodiment_id >= self.model.config.max_num_embodiments:
            raise CheckpointError(
                f"checkpoint {info.path / 'embodiment_id.json'}: {self.embodiment_tag} has projector row "
                f"{self.spec.embodiment_id}, the model has {self.model.config.max_num_embodiments}"
            )
        cfg = self.model.config
        self.noise_shape = (cfg.action_horizon, cfg.max_action_dim)
        self._forward = compiled_forward(self.model, self.compile)
        self._parameters = int(sum(p.numel() for p in self.model.parameters()))
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
        cfg = self.model.config
        model: dict[str, Any] = {
            "backend": self.backend,
            "path": self.model_path,
            "model_type": self.checkpoint.model_type,
            "parameters": self._parameters,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "embodiment_id": int(self.spec.embodiment_id),
            "compile": self.compile,
            "backbone_config": str(self.sources.config_file or "built-in dimensions"),
            "tokenizer": str(self.sources.tokenizer_dir or type(self.sources.tokenizer).__name__),
            "load_seconds": round(float(getattr(self, "load_seconds", 0.0)), 3),
            "warmup_seconds": None if self.warmup_seconds is None else round(self.warmup_seconds, 3),
        }
        if self.device.type == "cuda":
            model["device_name"] = torch.cuda.get_device_name(self.device)
        demo = self.checkpoint.config.get("fleet_demo")
        if isinstance(demo, dict) and isinstance(demo.get("preset"), str):
            model["preset"] = demo["preset"]
        side = self.processor.model_image_size()
        return {
            "embodiment_tag": self.embodiment_tag,
            "modality_config": {m: mc[m].to_json() for m in ("video", "state", "action", "language")},
            "state_dims": dict(self.spec.state_dims),
            "action_dims": dict(self.spec.action_dims),
            "action_horizon": int(self.spec.action_horizon),
            "noise_shape": [cfg.action_horizon, cfg.max_action_dim],
            "video_keys": list(self.spec.video_keys),
            "language_keys": list(self.spec.language_keys),
            "image_size": [int(side[0]), int(side[1])],
            "strict": bool(self.strict),
            "max_batch_per_request": int(self.max_batch_per_request),
            "model": model,
        }

    def prepare_request_options(self, options: dict[str, Any], batch_size: int, observation: Any,
                                clean: dict[str, Any]) -> dict[str, Any]:
        noise = options.get("noise")
        if noise is not None:
            want = (batch_size, *self.noise_shape)
            if not isinstance(noise, np.ndarray) or noise.dtype != np.float32 or noise.shape != want:
                got = f"{noise.dtype} {noise.shape}" if isinstance(noise, np.ndarray) else type(noise).__name__
                raise PolicyInputError(
                    f"options.noise: expected float32 array of shape {want} (B, action_horizon, max_action_dim), got {got}"
                )
            if not np.isfinite(noise).all():
                raise PolicyInputError("options.noise: expected finite values")
        rtc = parse_rtc(options, observation, batch_size, self.processor.codec, self._states([clean]),
                        self.spec.action_horizon)
        return {**options, RTC_OPTION: rtc} if rtc is not None else options

    def _noise(self, batch_size: int, options: dict[str, Any]) -> torch.Tensor:
        if options.get("noise") is not None:
            return torch.from_numpy(np.array(options["noise"], dtype=np.float32))  # a copy: wire arrays are read-only
        seed = options.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        return torch.randn((batch_size, *self.noise_shape), generator=gen, dtype=torch.float32)

    def _states(self, observations: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([np.asarray(o["state"][k], dtype=np.float32) for o in observations], axis=0)
                for k in self.spec.state_keys}

    def normalized_actions(self, observation: dict[str, Any], noise: np.ndarray | torch.Tensor,
                           update_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The model's normalised actions (B, action_horizon, max_action_dim), float32 on the CPU, for one
        observation, its initial noise and (real-time chunking, policy.rtc) the rows' update weights: what the
        precision tolerances are stated on."""
        clean, _ = self._prepare_observation(observation)
        inputs = self.processor.collate([clean], self._states([clean]), device=self.device, dtype=self.dtype)
        if update_weights is not None:
            inputs["update_weights"] = update_weights.to(self.device)
        with torch.inference_mode():
            return self.model(**inputs, noise=torch.as_tensor(noise, dtype=torch.float32).to(self.device)).cpu()

    def _initial_state(self, sizes: list[int], options: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0 of the whole batch and, where any request chunks in real time, the per-row update weights."""
        noise = [self._noise(b, o) for b, o in zip(sizes, options)]
        if not any(RTC_OPTION in o for o in options):
            return torch.cat(noise), None
        horizon = self.noise_shape[0]
        weights = []
        for x, b, o in zip(noise, sizes, options):
            rtc = o.get(RTC_OPTION)
            if rtc is None:
                weights.append(torch.ones(b, horizon, 1))
                continue
            x[:, : rtc.overlap, : rtc.prefix.shape[2]] = torch.from_numpy(rtc.prefix)
            x[:, : rtc.overlap, rtc.prefix.shape[2]:] = 0.0  # padded dims start from zero, as upstream's prefix
            weights.append(update_weights(horizon, rtc.frozen, rtc.overlap, rtc.ramp_rate)[None, :, None].expand(b, -1, -1))
        return torch.cat(noise), torch.cat(weights)

    def _infer(
        self, observations: list[dict[str, Any]], options: list[dict[str, Any]], sizes: list[int]
    ) -> list[dict[str, np.ndarray]]:
        noise, weights = self._initial_state(sizes, options)
        n = noise.shape[0]
        states = self._states(observations)
        fixed = self.compile != "none"
        inputs = self.processor.collate(observations, states, device=self.device, dtype=self.dtype,
                                        length_multiple=COMPILED_TEXT_MULTIPLE if fixed else 1)
        inputs["noise"] = noise.to(self.device)
        if weights is not None:
            inputs["update_weights"] = weights.to(self.device)
        if fixed:  # one shape per bucket: the compiled graph (or CUDA graph) is reused
            inputs = self.processor.pad_rows(inputs, n, bucket_for(n, self.batch_buckets))
        with torch.inference_mode():
            normalized = self._forward(**inputs)[:n].cpu().numpy()
        actions = self.processor.decode_actions(normalized, states)
        out: list[dict[str, np.ndarray]] = []
        start = 0
        for b, o in zip(sizes, options):
            mine = {k: np.ascontiguousarray(v[start : start + b]) for k, v in actions.items()}
            rtc = o.get(RTC_OPTION)
            if rtc is not None and rtc.exact_rows is not None:  # the frozen rows run anyway: exactly as given
                for k, rows in rtc.exact_rows.items():
                    mine[k][:, : rows.shape[1]] = rows
            out.append(mine)
            start += b
        return out

    def __repr__(self) -> str:
        return (
            f"NativePolicy(path={self.model_path!r}, embodiment_tag={self.embodiment_tag!r}, device={str(self.device)!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')!r}, strict={self.strict})"
        )


__all__ = ["BATCH_INVARIANCE_ATOL", "BackboneSources", "NativePolicy", "resolve_dtype"]
