"""Configuration of GR00T N1.6 as NVIDIA's checkpoints store it, with N1.6's defaults.

A GR00T N1.6 ``config.json`` (``model_type: "Gr00tN1d6"``) holds only the fields that differ from the defaults
of NVIDIA's ``Gr00tN1d6Config``; :meth:`Gr00tN1d6Config.from_checkpoint_dict` applies them over the defaults
written out here. The checkpoint does not describe its backbone at all: NVIDIA builds it from the
Eagle-Block2A-2B-v2 config that ships with its code, so the backbone dimensions default to that model's
(:class:`EagleBackboneConfig`, SigLIP2-so400m-style vision tower and Qwen3-1.7B text model) and an Eagle-style
``config.json`` (``backbone_config``) overrides them.

Plain dataclasses, not transformers configs: nothing here changes with the transformers version.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MODEL_TYPE = "Gr00tN1d6"
DEFAULT_BACKBONE = "nvidia/Eagle-Block2A-2B-v2"


class ConfigError(ValueError):
    """A configuration value the native model cannot run with; the message names the field and the file."""


def _fields_from(cls, data: Mapping[str, Any], where: str, *, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``cls``, type-checked against its defaults."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name in ignore:
            continue
        value = data[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{f.name}: expected {type(default).__name__}, got {value!r:.60}")
        out[f.name] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Backbone (Eagle-Block2A-2B-v2 layout: SigLIP2-variant vision tower + mlp1 + Qwen3)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiglipVisionConfig:
    """The vision tower of Eagle-Block2A-2B-v2 (a SigLIP2 variant: linear patch embedding, learned position table
    resized to each image's patch grid, full attention within an image)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    num_patches: int = 256
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_rope: bool = False
    use_windows_attn: bool = False

    @property
    def position_grid(self) -> int:
        return int(math.isqrt(self.num_patches))

    def check(self, where: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}.hidden_size {self.hidden_size} is not a multiple of num_attention_heads")
        if self.position_grid**2 != self.num_patches:
            raise ConfigError(f"{where}.num_patches: expected a square number, got {self.num_patches}")
        if self.use_rope or self.use_windows_attn:
            raise ConfigError(
                f"{where}: use_rope / use_windows_attn are set; GR00T N1.6's backbone uses neither (full attention "
                "within each image, learned positions), and the native backend implements that form only"
            )
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"{where}.hidden_act: expected gelu_pytorch_tanh or gelu, got {self.hidden_act!r}")


@dataclass(frozen=True)
class Qwen3TextConfig:
    """Qwen3-1.7B, the text model of Eagle-Block2A-2B-v2 (only the first ``select_layer`` layers are built)."""

    vocab_size: int = 151680
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    attention_bias: bool = False
    hidden_act: str = "silu"

    def check(self, where: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"{where}.hidden_act: expected silu, got {self.hidden_act!r}")


@dataclass(frozen=True)
class EagleBackboneConfig:
    vision: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    text: Qwen3TextConfig = field(default_factory=Qwen3TextConfig)
    downsample_ratio: float = 0.5  # 2x2 pixel unshuffle before mlp1
    image_token_index: int = 151669  # <IMG_CONTEXT>
    select_layer: int = -1  # vision: the tower's last hidden state (after the post-layernorm)
    source: str = f"{DEFAULT_BACKBONE} (built-in dimensions)"

    @property
    def unshuffle(self) -> int:
        return int(round(1 / self.downsample_ratio))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> "EagleBackboneConfig":
        """From an Eagle-style backbone ``config.json`` (``vision_config``, ``text_config`` and top-level fields)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object")
        vision = data.get("vision_config", {})
        text = data.get("text_config", {})
        if not isinstance(vision, Mapping) or not isinstance(text, Mapping):
            raise ConfigError(f"{source}: vision_config and text_config must be objects")
        text = dict(text)
        rope = text.get("rope_parameters")  # transformers 5 spelling of rope_theta
        if "rope_theta" not in text and isinstance(rope, Mapping) and "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if text.get("rope_scaling") not in (None, {}) or (
            isinstance(rope, Mapping) and rope.get("rope_type", "default") != "default"
        ):
            raise ConfigError(f"{source}: text_config uses RoPE scaling; Qwen3 in N1.6 uses plain RoPE")
        if text.get("use_sliding_window"):
            raise ConfigError(f"{source}: text_config.use_sliding_window is set; N1.6's Qwen3 attends to the whole prompt")
        cfg = cls(
            vision=SiglipVisionConfig(**_fields_from(SiglipVisionConfig, vision, f"{source} vision_config")),
            text=Qwen3TextConfig(**_fields_from(Qwen3TextConfig, text, f"{source} text_config")),
            source=source,
            **_fields_from(cls, data, source, ignore=("vision", "text", "source")),
        )
        if data.get("use_pixel_shuffle") is False:
            raise ConfigError(f"{source}: use_pixel_shuffle is false; N1.6 unshuffles the patch grid before mlp1")
        cfg.check()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "EagleBackboneConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"backbone_config {p}: file not found") from None
        except ValueError as exc:
            raise ConfigError(f"backbone_config {p}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(p))

    def check(self) -> None:
        self.vision.check(f"{self.source} vision_config")
        self.text.check(f"{self.source} text_config")
        if self.select_layer != -1:
            raise ConfigError(f"{self.source}.select_layer: expected -1 (the vision tower's output), got {self.select_layer}")
        if self.unshuffle < 1 or abs(1 / self.unshuffle - self.downsample_ratio) > 1e-9:
            raise ConfigError(f"{self.source}.downsample_ratio: expected 1/k, got {self.downsample_ratio}")

    def to_dict(self) -> dict[str, Any]:
        """An Eagle-style config.json body (what :meth:`from_dict` reads back)."""
        return {
            "model_type": "eagle_3_vl",
            "downsample_ratio": self.downsample_ratio,
            "image_token_index": self.image_token_index,
            "select_layer": self.select_layer,
            "use_pixel_shuffle": True,
            "vision_config": {"model_type": "siglip2_vision_model", **dataclasses.asdict(self.vision)},
            "text_config": {"model_type": "qwen3", **dataclasses.asdict(self.text)},
        }


# ----------------------------------------------------------------------------------------------------------------
# The action head's DiT (diffusers-style config, N1.6 values as defaults)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    # The DiT class's own defaults where N1.6's diffusion_model_cfg leaves a key out ...
    num_attention_heads: int = 32
    attention_head_dim: int = 48
    output_dim: int = 1024
    num_layers: int = 32
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_type: str = "ada_norm"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    max_num_positional_embeddings: int = 512
    positional_embeddings: str | None = None
    interleave_self_attention: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "DiTConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object")
        # ... and the class defaults (not N1.6's) for keys N1.6's default dict does not list.
        base = {"attention_bias": True, "activation_fn": "gelu-approximate", "norm_type": "ada_norm",
                "norm_elementwise_affine": False, "norm_eps": 1e-5, "max_num_positional_embeddings": 512}
        merged = {**base, **{k: v for k, v in data.items() if k != "positional_embeddings"}}
        kw = _fields_from(cls, merged, where)
        if "positional_embeddings" in data:
            kw["positional_embeddings"] = data["positional_embeddings"]
        else:  # the DiT class's own default; N1.6's default dict sets it to null explicitly
            kw["positional_embeddings"] = "sinusoidal"
        cfg = cls(**kw)
        if cfg.norm_type != "ada_norm":
            raise ConfigError(f"{where}.norm_type: expected ada_norm, got {cfg.norm_type!r}")
        if cfg.activation_fn not in ("gelu-approximate", "gelu"):
            raise ConfigError(f"{where}.activation_fn: expected gelu-approximate or gelu, got {cfg.activation_fn!r}")
        if cfg.positional_embeddings not in (None, "sinusoidal"):
            raise ConfigError(f"{where}.positional_embeddings: expected null or sinusoidal, got {cfg.positional_embeddings!r}")
        return cfg


HEAD_SIZES = ("select_layer", "backbone_embedding_dim", "max_state_dim", "max_action_dim", "action_horizon",
              "hidden_size", "input_embedding_dim", "num_inference_timesteps", "max_num_embodiments")


def check_head_fields(cfg: Any, where: str, sizes: tuple[str, ...] = HEAD_SIZES) -> None:
    """The checks of what the flow-matching head reads (policy.flow_matching.HeadConfig), shared by N1.6 and N1.7:
    positive ``sizes``, a DiT whose width and output fit the head, positions that cover the horizon."""
    for name in sizes:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}.{name}: expected a positive int, got {getattr(cfg, name)}")
    if cfg.dit.inner_dim != cfg.input_embedding_dim:
        raise ConfigError(
            f"{where}: the DiT's width (num_attention_heads x attention_head_dim = {cfg.dit.inner_dim}) must equal "
            f"input_embedding_dim {cfg.input_embedding_dim}"
        )
    if cfg.dit.output_dim != cfg.hidden_size:
        raise ConfigError(f"{where}: diffusion_model_cfg.output_dim {cfg.dit.output_dim} != hidden_size {cfg.hidden_size}")
    if cfg.add_pos_embed and cfg.action_horizon > cfg.max_seq_len:
        raise ConfigError(f"{where}: action_horizon {cfg.action_horizon} > max_seq_len {cfg.max_seq_len}")
    if cfg.use_alternate_vl_dit and not cfg.dit.interleave_self_attention:
        raise ConfigError(f"{where}: use_alternate_vl_dit needs diffusion_model_cfg.interleave_self_attention")
    if cfg.attend_text_every_n_blocks < 1:
        raise ConfigError(f"{where}.attend_text_every_n_blocks: expected >= 1")


N1D6_DIFFUSION_MODEL_CFG: dict[str, Any] = {
    "positional_embeddings": None,
    "num_layers": 32,
    "num_attention_heads": 32,
    "attention_head_dim": 48,
    "norm_type": "ada_norm",
    "dropout": 0.2,
    "final_dropout": True,
    "output_dim": 1024,
    "interleave_self_attention": True,
}


@dataclass(frozen=True)
class Gr00tN1d6Config:
    """The inference-relevant fields of NVIDIA's ``Gr00tN1d6Config``, with its defaults."""

    model_name: str = DEFAULT_BACKBONE
    backbone_model_type: str = "eagle"
    select_layer: int = 16  # LLM layers kept (the layers above are deleted)
    backbone_embedding_dim: int = 2048
    max_state_dim: int = 29
    max_action_dim: int = 29
    action_horizon: int = 16
    hidden_size: int = 1024  # DiT output width, state/action MLP hidden width
    input_embedding_dim: int = 1536  # width of the state and action tokens
    add_pos_embed: bool = True
    use_vlln: bool = True
    max_seq_len: int = 1024
    use_alternate_vl_dit: bool = True
    attend_text_every_n_blocks: int = 2
    num_inference_timesteps: int = 4
    num_timestep_buckets: int = 1000
    max_num_embodiments: int = 32
    state_dropout_prob: float = 0.0
    apply_sincos_state_encoding: bool = False
    use_relative_action: bool = False
    dit: DiTConfig = field(default_factory=lambda: DiTConfig.from_dict(N1D6_DIFFUSION_MODEL_CFG, "diffusion_model_cfg"))

    @property
    def state_input_dim(self) -> int:
        """Width of the state encoder's input (N1.6: one normalised state step per token)."""
        return self.max_state_dim

    @classmethod
    def from_checkpoint_dict(cls, data: Mapping[str, Any], where: str = "config.json") -> "Gr00tN1d6Config":
        if data.get("model_type") not in (None, MODEL_TYPE):
            raise ConfigError(f"{where}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        kw = _fields_from(cls, data, where, ignore=("dit",))
        dit_cfg = data.get("diffusion_model_cfg", N1D6_DIFFUSION_MODEL_CFG)
        kw["dit"] = DiTConfig.from_dict(dit_cfg, f"{where} diffusion_model_cfg")
        cfg = cls(**kw)
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        check_head_fields(self, where)
        if self.backbone_model_type != "eagle":
            raise ConfigError(f"{where}.backbone_model_type: expected 'eagle', got {self.backbone_model_type!r}")


__all__ = [
    "ConfigError",
    "DEFAULT_BACKBONE",
    "DiTConfig",
    "EagleBackboneConfig",
    "Gr00tN1d6Config",
    "MODEL_TYPE",
    "Qwen3TextConfig",
    "SiglipVisionConfig",
]
